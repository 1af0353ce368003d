"""Fault tolerance for training runs: atomic checkpoints, non-finite steps, RNG, preflight."""

from vlm_lit.reliability.checkpoint_io import AtomicCheckpointIO, use_atomic_checkpoints
from vlm_lit.reliability.data_counters import DataCountersLogger
from vlm_lit.reliability.ddp import image_side_parameters, unused_parameter_anchor
from vlm_lit.reliability.fsdp import fsdp_strategy, fsdp_wrap_classes
from vlm_lit.reliability.nonfinite import NonFiniteGuard
from vlm_lit.reliability.preflight import check_backbone_paths
from vlm_lit.reliability.rng_state import RNGStateCallback
from vlm_lit.reliability.token_mean import TokenMean

__all__ = [
    "AtomicCheckpointIO",
    "DataCountersLogger",
    "NonFiniteGuard",
    "RNGStateCallback",
    "TokenMean",
    "check_backbone_paths",
    "fsdp_strategy",
    "fsdp_wrap_classes",
    "image_side_parameters",
    "unused_parameter_anchor",
    "use_atomic_checkpoints",
]
