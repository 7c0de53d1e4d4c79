"""Checkpoint-compatible model assemblies built from attnkit modules (BERT; helpers for other loaders)."""

from attnkit.models._checkpoint import CheckpointError, load_state, read_config, read_tensors
from attnkit.models.bert import BertConfig, BertModel
from attnkit.models.pooling import mean_pooling

__all__ = [
    "BertConfig",
    "BertModel",
    "CheckpointError",
    "load_state",
    "mean_pooling",
    "read_config",
    "read_tensors",
]
