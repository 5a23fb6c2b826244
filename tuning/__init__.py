"""Search spaces, Tuner construction and result tables (later issues)."""
