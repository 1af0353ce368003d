"""Packaged YAML recipes (the embedded default)."""
