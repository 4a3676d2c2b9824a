"""STUN and TURN server (RFC 8489, RFC 8656)."""
