"""The embedded default: a shapes world with a pretrained tiny CLIP tower and LM, built once."""

from vlm_lit.world.build import PROFILES, WORLD_VERSION, ShapesWorld, ensure_world, vlm_lit_home

__all__ = ["PROFILES", "WORLD_VERSION", "ShapesWorld", "ensure_world", "vlm_lit_home"]
