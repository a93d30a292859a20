"""Training gist tokens (accelerate lives only here)."""
