"""Exact merging of partial attentions through their log-sum-exp, and attention sinks as one such part.

If ``out_i = softmax(s_{K_i}) V_{K_i}`` and ``lse_i = logsumexp(s_{K_i})`` over disjoint key sets ``K_i``, the
attention over their union is ``out = Σ_i exp(lse_i - lse) · out_i`` with ``lse = logsumexp_i(lse_i)``
(Milakov & Gimelshein 2018; the merge step of FlashAttention's online softmax, of split-KV decoding and of Ring
Attention, Liu et al. 2023). An attention sink (Xiao et al. 2023; gpt-oss) is a part with ``lse = sink`` and
output 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["add_sinks", "merge_attention", "merge_into"]


def _safe_lse(lses: Tensor) -> Tensor:
    """``logsumexp`` over dim 0 that gives ``-inf`` (with zero, not NaN, gradients) when every part is ``-inf``."""
    m = lses.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    total = torch.exp(lses - m_safe).sum(0)
    nonempty = total > 0
    return torch.where(nonempty, m_safe + torch.log(torch.where(nonempty, total, torch.ones_like(total))), m)


def merge_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Merge attentions over disjoint key sets into the attention over their union, exactly, with autograd.

    Args:
        outputs: ``P`` tensors ``(..., H, Lq, Dv)`` (any float dtype).
        lses: ``P`` matching log-sum-exps ``(..., H, Lq)`` (``-inf`` for rows with no key in that part).

    Returns:
        ``(output, lse)``: ``output`` in the dtype of ``outputs[0]`` (merged in float32, float64 for float64),
        ``lse`` in float32 (float64). Rows empty in every part give output 0 and lse ``-inf``.

    Raises:
        ValueError: no parts, or parts whose shapes differ.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(
            f"merge_attention: expected as many outputs as lses (at least one), got {len(outputs)} and {len(lses)}"
        )
    shape = outputs[0].shape
    for i, (o, lse) in enumerate(zip(outputs, lses)):
        if o.shape != shape or lse.shape != shape[:-1]:
            raise ValueError(
                f"merge_attention: part {i} has output {tuple(o.shape)} and lse {tuple(lse.shape)}; expected "
                f"output {tuple(shape)} and lse {tuple(shape[:-1])} like part 0"
            )
    acc = torch.float64 if outputs[0].dtype == torch.float64 else torch.float32
    lse, weights = _merge_weights(torch.stack([lse.to(acc) for lse in lses]))  # (P, ..., H, Lq)
    out = sum(w.unsqueeze(-1) * o.to(acc) for w, o in zip(weights, outputs))
    return out.to(outputs[0].dtype), lse


def _merge_weights(stacked: Tensor) -> tuple[Tensor, Tensor]:
    """The merged log-sum-exp of ``P`` parts ``(P, ..., Lq)`` and each part's weight ``exp(lse_i - lse)`` (0 for
    an empty part, and for every part of a row empty in all of them)."""
    lse = _safe_lse(stacked)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return lse, torch.exp(stacked - lse_safe)


@torch.no_grad()
def merge_into(out: Tensor, lse: Tensor, part_output: Tensor, part_lse: Tensor) -> None:
    """:func:`merge_attention` of ``(out, lse)`` and one more part, written into ``out`` and ``lse`` in place.

    The accumulator form of the merge for loops over key blocks (ring attention's steps, split-KV decoding): no
    temporary of the output's size is allocated, so a loop holds one accumulator. Not differentiable (use
    :func:`merge_attention`, or an autograd function whose backward does not need the merge's graph).

    Args:
        out: ``(..., H, Lq, Dv)`` accumulator, float32 (float64), updated in place; start from zeros.
        lse: ``(..., H, Lq)`` its log-sum-exp, same dtype, updated in place; start from ``-inf``.
        part_output: ``(..., H, Lq, Dv)`` the new part's output (any float dtype).
        part_lse: ``(..., H, Lq)`` its log-sum-exp (``-inf`` for rows with no key in the part).

    Raises:
        ValueError: shapes that differ, or an accumulator that is not float32/float64.
    """
    if out.dtype not in (torch.float32, torch.float64) or lse.dtype != out.dtype:
        raise ValueError(f"merge_into: expected float32/float64 accumulators, got out {out.dtype}, lse {lse.dtype}")
    if part_output.shape != out.shape or part_lse.shape != lse.shape or lse.shape != out.shape[:-1]:
        raise ValueError(
            f"merge_into: expected out {tuple(out.shape)} / lse {tuple(out.shape[:-1])} and a part of the same "
            f"shapes, got lse {tuple(lse.shape)}, part output {tuple(part_output.shape)}, part lse "
            f"{tuple(part_lse.shape)}"
        )
    new_lse, (w_acc, w_part) = _merge_weights(torch.stack([lse, part_lse.to(lse.dtype)]))
    out.mul_(w_acc.unsqueeze(-1)).addcmul_(part_output, w_part.unsqueeze(-1))
    lse.copy_(new_lse)


def add_sinks(output: Tensor, lse: Tensor, sinks: Tensor, *, weights: Tensor | None = None):
    """Let one logit per head join every row's softmax with a zero value (an attention sink).

    Args:
        output: ``(B..., H, Lq, Dv)`` attention output without the sink.
        lse: ``(B..., H, Lq)`` its log-sum-exp (float32/float64).
        sinks: ``(H,)`` or ``(B..., H)`` sink logits.
        weights: optional ``(B..., H, Lq, Lk)`` probabilities without the sink.

    Returns:
        ``(output, lse, weights)`` with the sink: output and weights scaled by ``exp(lse - lse')``,
        ``lse' = logaddexp(lse, sink)``; a row with no key gives output 0 and ``lse' = sink``.
    """
    sink = sinks.to(lse.dtype).unsqueeze(-1).expand(lse.shape)
    new_lse = _safe_lse(torch.stack([lse, sink]))
    factor = torch.exp(lse - new_lse)  # exp(-inf) = 0 for empty rows
    out = (output.to(lse.dtype) * factor.unsqueeze(-1)).to(output.dtype)
    if weights is not None:
        weights = (weights.to(lse.dtype) * factor.unsqueeze(-1)).to(weights.dtype)
    return out, new_lse, weights
