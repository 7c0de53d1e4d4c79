"""Exact merge of partial attentions through their log-sum-exp.

Attention over the union of disjoint key sets ``K = K_1 ∪ ... ∪ K_n`` is a weighted sum of the attentions over
each part: with ``lse_i = log Σ_{j∈K_i} exp(s_j)``, ``lse = log Σ_i exp(lse_i)`` and ``o = Σ_i exp(lse_i - lse) ·
o_i`` (Milakov & Gimelshein 2018, online softmax; Liu et al. 2023, Ring Attention; Dao et al. 2023,
Flash-Decoding's split-KV reduction). Ring/context-parallel attention and split-KV decoding both reduce to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["merge_attention"]


def _check(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> None:
    if isinstance(outputs, Tensor) or isinstance(lses, Tensor):
        raise TypeError("merge_attention: expected outputs and lses as sequences of tensors (one per part)")
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(
            f"merge_attention: expected as many lses as outputs (at least one), got {len(outputs)} outputs and "
            f"{len(lses)} lses"
        )
    ref_o, ref_l = outputs[0], lses[0]
    for i, (o, lse) in enumerate(zip(outputs, lses)):
        if not isinstance(o, Tensor) or not isinstance(lse, Tensor):
            raise TypeError(f"merge_attention: part {i} is not a pair of tensors")
        if not o.dtype.is_floating_point or not lse.dtype.is_floating_point:
            raise TypeError(f"merge_attention: part {i} has dtypes {o.dtype}/{lse.dtype}; expected floating tensors")
        if o.ndim < 1 or tuple(o.shape[:-1]) != tuple(lse.shape):
            raise ValueError(
                f"merge_attention: part {i}: output {tuple(o.shape)} and lse {tuple(lse.shape)} do not match; "
                f"expected output (..., L, Dv) and lse (..., L)"
            )
        if o.shape != ref_o.shape or lse.shape != ref_l.shape:
            raise ValueError(
                f"merge_attention: part {i} has output {tuple(o.shape)}, part 0 has {tuple(ref_o.shape)}; "
                f"every part must have the same shape"
            )
        if o.device != ref_o.device or lse.device != ref_o.device:
            raise ValueError(f"merge_attention: part {i} is on another device than part 0")


def merge_attention(
    outputs: Sequence[Tensor], lses: Sequence[Tensor], *, out_dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    r"""Merge attentions of the same queries over disjoint key sets into the attention over their union.

    ``lse = log Σ_i exp(lse_i)``, ``output = Σ_i exp(lse_i - lse) · output_i``, computed in float32 (float64 if
    any input is float64) whatever the inputs' dtype, so merging many bfloat16 parts loses no accuracy beyond
    the final rounding. Differentiable (plain autograd) with respect to every output and lse.

    Args:
        outputs: ``n >= 1`` tensors ``(..., L, Dv)``, each the attention output of the queries over one key set
            (as returned by :func:`attnkit.attention`).
        lses: ``n`` tensors ``(..., L)``, the matching log-sum-exps (``return_lse=True``); ``-inf`` marks a row
            with no key in that part (its output is ignored).
        out_dtype: dtype of the merged output; default that of ``outputs[0]``.

    Returns:
        ``(output (..., L, Dv), lse (..., L))``: ``lse`` in float32 (float64 for float64 inputs). A row with no
        key in any part gets output 0 and lse ``-inf`` (never NaN), and zero gradients.

    Raises:
        TypeError: non-tensor or non-floating parts, or a single tensor instead of a sequence.
        ValueError: no parts, counts that differ, or shapes/devices that do not match.

    References:
        Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; Liu, Zaharia & Abbeel 2023,
        "Ring Attention with Blockwise Transformers", Sec. 3; Dao et al. 2023, "Flash-Decoding".

    Example:
        >>> import torch, attnkit
        >>> from attnkit.distributed import merge_attention
        >>> q, k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 10, 8), torch.randn(1, 2, 10, 8)
        >>> a = attnkit.attention(q, k[..., :4, :], v[..., :4, :], return_lse=True)
        >>> b = attnkit.attention(q, k[..., 4:, :], v[..., 4:, :], return_lse=True)
        >>> out, lse = merge_attention([a.output, b.output], [a.lse, b.lse])
        >>> torch.allclose(out, attnkit.attention(q, k, v), atol=1e-6)
        True
    """
    _check(outputs, lses)
    acc = torch.float64 if any(t.dtype == torch.float64 for t in (*outputs, *lses)) else torch.float32
    out_dtype = outputs[0].dtype if out_dtype is None else out_dtype
    lse_all = torch.stack([lse.to(acc) for lse in lses])  # (n, ..., L)
    # The result does not depend on the shift m, so it is detached: its gradient is exactly zero.
    m = lse_all.amax(0).detach()
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    w = torch.exp(lse_all - m)  # parts with lse = -inf weigh exactly 0
    total = w.sum(0)
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    lse = torch.where(nonempty, m + torch.log(safe_total), torch.full_like(total, float("-inf")))
    w = w / safe_total
    out = None
    for wi, o in zip(w, outputs):
        term = wi.unsqueeze(-1) * o.to(acc)
        out = term if out is None else out + term
    return out.to(out_dtype), lse
