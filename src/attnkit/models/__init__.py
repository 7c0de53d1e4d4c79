"""Checkpoint-compatible model assemblies built from attnkit modules (BERT, the character-level decoder); the checkpoint
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
from attnkit.models.char_decoder import CharDecoder, bits_per_char, load_char_decoder
from attnkit.models.pooling import mean_pooling

__all__ = [
    "BertConfig",
    "BertModel",
    "CharDecoder",
    "CheckpointError",
    "NonFiniteWeightsWarning",
    "bits_per_char",
    "load_char_decoder",
    "load_checkpoint",
    "load_state",
    "mean_pooling",
    "read_config",
    "read_header",
    "read_tensors",
]
