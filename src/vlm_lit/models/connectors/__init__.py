"""Connectors that carry vision features into the language model."""
