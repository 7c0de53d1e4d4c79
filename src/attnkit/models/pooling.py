"""Sentence embeddings from token embeddings: the sentence-transformers mean-pooling recipe.

Reimers & Gurevych 2019, "Sentence-BERT", Sec. 3 (MEAN strategy); all-MiniLM-L6-v2 then L2-normalises
(its ``modules.json``: Transformer -> Pooling(mean) -> Normalize).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mean_pooling"]


def mean_pooling(last_hidden_state: Tensor, attention_mask: Tensor | None = None, *, normalize: bool = True) -> Tensor:
    """Average the token embeddings of the real (non-padding) tokens, then optionally L2-normalise.

    ``e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)``, then ``e / max(||e||_2, 1e-12)`` when ``normalize``.

    Args:
        last_hidden_state: ``(B, L, E)`` token embeddings.
        attention_mask: ``(B, L)``, 1 = real token, 0 = padding (transformers' convention); default all real.
        normalize: L2-normalise each sentence embedding (default, as all-MiniLM-L6-v2 does).

    Returns:
        ``(B, E)`` sentence embeddings in the dtype of ``last_hidden_state``; a sentence with no real token
        gives 0.

    Raises:
        ValueError: ``last_hidden_state`` is not 3-D, or ``attention_mask`` is not ``(B, L)``.

    Example:
        >>> h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]])
        >>> mean_pooling(h, torch.tensor([[1, 1, 0]]), normalize=False).tolist()
        [[2.0, 0.0]]
    """
    if last_hidden_state.ndim != 3:
        raise ValueError(
            f"mean_pooling: expected last_hidden_state of shape (B, L, E), got {tuple(last_hidden_state.shape)}"
        )
    if attention_mask is None:
        attention_mask = torch.ones(last_hidden_state.shape[:2], device=last_hidden_state.device)
    if tuple(attention_mask.shape) != tuple(last_hidden_state.shape[:2]):
        raise ValueError(
            f"mean_pooling: expected attention_mask of shape {tuple(last_hidden_state.shape[:2])}, got "
            f"{tuple(attention_mask.shape)}"
        )
    weights = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)  # (B, L, 1)
    summed = (last_hidden_state * weights).sum(dim=1)
    pooled = summed / weights.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2.0, dim=-1) if normalize else pooled
