"""Shared pytest setup: offline, deterministic, small thread count."""

from __future__ import annotations

import os

import pytest

# The hubs are unreachable; make any accidental download fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _seed_everything() -> None:
    """Every test starts from the same RNG state so failures reproduce."""
    import random

    import torch

    random.seed(0)
    torch.manual_seed(0)
