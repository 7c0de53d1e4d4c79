"""The ``"math"`` backend: the reference implementation of every option.

Materializes the ``(*batch, H, Lq, Lk)`` score matrix as one tile of :class:`attnkit.functional.tiles.TileSetup`
(the one definition of the scores and masks), computes a numerically safe softmax in float32 (float64 for
float64 inputs), and relies on autograd for gradients (also to ``alibi_slopes``, ``sinks``, float masks and
tensors a ``score_mod`` captures). Every other backend is tested against it run in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.functional.registry import ALL_OPTIONS, Backend, register
from attnkit.functional.spec import AttentionSpec
from attnkit.functional.tiles import TileSetup, reshape_qkv, whole

__all__ = ["math_attention", "math_forward"]


def math_forward(
    spec: AttentionSpec, *, probs_leaf: bool = False, need_lse: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Reference attention for ``spec``, including its sinks.

    Args:
        spec: the call.
        probs_leaf: make the probabilities an autograd leaf when nothing upstream requires grad, so that the
            gradient of a loss with respect to them exists (what relevance methods need).
        need_lse: compute the log-sum-exp (``False``: ``None`` is returned in its place, and an unmasked call's
            softmax is one kernel, :meth:`~attnkit.functional.tiles.TileSetup.tile_probs`).

    Returns:
        ``(output (*batch, H, Lq, Dv) in the value dtype, probs (*batch, H, Lq, Lk) float32/float64, lse
        (*batch, H, Lq) or None)``; ``probs`` is on the autograd path of ``output`` (before dropout).
    """
    setup = TileSetup(spec)
    if setup.plain and setup.G == 1:  # the scores alone, in the call's own layout: no tile reshapes (short calls)
        s = torch.matmul(setup.prepare_query(spec.query), setup.prepare_kv(spec.key).transpose(-1, -2))
        probs, lse = setup.tile_probs(s, lse=need_lse)
        out = torch.matmul(_used(spec, probs, probs_leaf), setup.prepare_kv(spec.value))
    else:
        q5, k4, v4 = reshape_qkv(spec)
        B, Hkv, G, Lq, D = q5.shape
        qt = setup.prepare_query(q5).reshape(B, Hkv, 1, G * Lq, D)
        kt = setup.prepare_kv(k4).unsqueeze(2)  # (B, Hkv, 1, Lk, D)
        s = setup.logits(qt, kt, 1, Lq)  # (B, Hkv, 1, G, Lq, Lk)
        if not setup.plain:  # a plain call's scores are final: no tile of terms to build
            s = setup.masked_logits(s, whole(spec))
        probs, lse = setup.tile_probs(s, lse=need_lse)
        probs = probs.reshape(spec.scores_shape)  # the tensor returned is the one the output is computed from
        used = _used(spec, probs, probs_leaf).reshape(B, Hkv, 1, G * Lq, -1)
        out = torch.matmul(used, setup.prepare_kv(v4).unsqueeze(2))
        out = out.reshape((*spec.query.shape[:-1], spec.value.shape[-1]))
        lse = lse.reshape(spec.query.shape[:-1]) if lse is not None else None
    if out.dtype != spec.value.dtype:
        out = out.to(spec.value.dtype)
    return out, probs, lse


def _used(spec: AttentionSpec, probs: Tensor, probs_leaf: bool) -> Tensor:
    """The probabilities the output is computed from: ``probs`` made an autograd leaf if asked (in place, so the
    caller's tensor is the leaf), then dropped out with ``spec.dropout_p``."""
    if probs_leaf and torch.is_grad_enabled() and not probs.requires_grad:
        probs.requires_grad_()
    if spec.dropout_p > 0:
        return torch.nn.functional.dropout(probs, p=spec.dropout_p, training=True)
    return probs


def math_attention(spec: AttentionSpec) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The ``"math"`` backend's forward: ``(output, weights or None, lse or None)`` (see :class:`AttentionOutput`)."""
    out, probs, lse = math_forward(spec, need_lse=spec.return_lse)
    weights = probs.to(spec.query.dtype) if spec.return_weights else None
    return out, weights, (lse if spec.return_lse else None)


MATH = register(
    Backend(
        name="math",
        forward=math_attention,
        options=ALL_OPTIONS,
        priority=100,
        description="reference: materializes the scores; every option; float32 softmax (float64 for float64)",
    )
)
