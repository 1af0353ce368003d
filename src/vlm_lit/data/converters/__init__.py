"""Converters from public dataset formats (LLaVA, img2dataset, MMC4) to vlm_lit shards."""
