"""Checkpoint-compatible model assemblies built from attnkit modules (BERT, the digit classifiers); the checkpoint
readers of :mod:`attnkit.io` re-exported."""

from attnkit.io.checkpoint import (
    CheckpointError,
    NonFiniteWeightsWarning,
    load_checkpoint,
    load_state,
    read_config,
    read_header,
    read_tensors,
)
from attnkit.models.bert import BertConfig, BertModel
from attnkit.models.pooling import mean_pooling

__all__ = [
    "BertConfig",
    "BertModel",
    "CheckpointError",
    "NonFiniteWeightsWarning",
    "load_checkpoint",
    "load_state",
    "mean_pooling",
    "read_config",
    "read_header",
    "read_tensors",
]
