"""Data: response-only tokenization, safe WebDataset shards, the DataModule, converters."""
