"""Reading and writing files without trusting them: checkpoint directories (safetensors headers first, regular
files only, small and shallow JSON) and atomic, no-clobber writes. Imports nothing else from attnkit."""

from attnkit.io.checkpoint import (
    CheckpointError,
    NonFiniteWeightsWarning,
    TensorInfo,
    check_finite,
    load_checkpoint,
    load_state,
    read_config,
    read_header,
    read_json,
    read_tensors,
)

__all__ = [
    "CheckpointError",
    "NonFiniteWeightsWarning",
    "TensorInfo",
    "check_finite",
    "load_checkpoint",
    "load_state",
    "read_config",
    "read_header",
    "read_json",
    "read_tensors",
]
