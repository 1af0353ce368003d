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


@pytest.fixture(scope="session")
def micro_world_home(tmp_path_factory: pytest.TempPathFactory):
    """``$VLM_LIT_HOME`` pointing at a private cache holding the micro shapes world, built once
    per test session (seconds) and shared by every test that runs the CLI end to end."""
    home = tmp_path_factory.mktemp("vlm_lit_home")
    old = os.environ.get("VLM_LIT_HOME")
    os.environ["VLM_LIT_HOME"] = str(home)
    from vlm_lit.world import ensure_world

    ensure_world(profile="micro")
    yield home
    if old is None:
        os.environ.pop("VLM_LIT_HOME", None)
    else:
        os.environ["VLM_LIT_HOME"] = old
