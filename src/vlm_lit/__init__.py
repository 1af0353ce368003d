"""vlm_lit: fair, matched comparisons of LLaVA-style vision-language connectors."""

__version__ = "0.1.0"
