"""Natter test suite (a package, so `tests.*` never resolves to a stray site-packages `tests`)."""
