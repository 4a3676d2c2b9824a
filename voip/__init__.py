"""Opus/RTP media relay for Jingle calls."""
