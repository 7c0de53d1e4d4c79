"""Text-model utilities built on attnkit: load local checkpoints, score tokens, extractive summaries."""

from attnkit.text.models import TextModel, TextModelError, default_model_dir, load_text_model
from attnkit.text.scores import METHODS, capture_maps, summary_index, token_scores, top_tokens

__all__ = [
    "METHODS",
    "TextModel",
    "TextModelError",
    "capture_maps",
    "default_model_dir",
    "load_text_model",
    "summary_index",
    "token_scores",
    "top_tokens",
]
