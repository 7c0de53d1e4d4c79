"""``attnkit.attention``: scaled dot-product attention with every common mask, on any registered backend."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnkit.functional import observe
from attnkit.functional.block_mask import BlockMask
from attnkit.functional.mods import MaskMod, ScoreMod
from attnkit.functional.registry import dispatch, plain_choice
from attnkit.functional.spec import AttentionOutput, AttentionSpec, default_scale, make_spec

__all__ = ["attention"]

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SDPA = torch._C._nn.scaled_dot_product_attention  # the kernel itself, not a module attribute a capture may patch


def _is_plain(query, key, value, is_causal, scale) -> bool:
    """Whether ``attention(query, key, value, is_causal=..., scale=...)`` is the plain call: plain ``torch.Tensor``
    inputs of shape ``(B, H, L, D)``, one floating dtype (float32/bfloat16/float16) and device, no grouped heads,
    ``Lq == Lk`` (so torch's top-left ``is_causal`` equals attnkit's bottom-right one), nothing empty, unit-stride
    head dims, a bool ``is_causal`` and a finite float ``scale`` or None: everything :func:`make_spec` would check
    holds, so its spec can be built directly."""
    if not (type(query) is Tensor and type(key) is Tensor and type(value) is Tensor):
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    dtype, device = query.dtype, query.device
    if dtype not in _FAST_DTYPES or key.dtype != dtype or value.dtype != dtype:
        return False
    if key.device != device or value.device != device:
        return False
    qs, ks, vs = query.shape, key.shape, value.shape
    if qs != ks or ks[:3] != vs[:3] or 0 in qs or vs[3] == 0:
        return False
    if query.stride(-1) != 1 or key.stride(-1) != 1 or value.stride(-1) != 1:
        return False
    if not (is_causal is False or is_causal is True):
        return False
    return scale is None or (type(scale) is float and math.isfinite(scale))


def _plain_call(query, key, value, is_causal, scale) -> Tensor | AttentionSpec | None:
    """The most common call without :func:`make_spec`'s validation (:func:`_is_plain` has checked all of it): the
    SDPA kernel's output when that is what ``auto`` runs and nobody observes the call, in ~10 us of Python instead
    of ~60 (``benchmarks/RESULTS.md``: at L = 512 in bfloat16 that was 5-9% of the call); its spec when an observer
    or interceptor is installed (capture, LRP: they need the spec) or a backend registered ahead of ``"sdpa"``
    would serve it (:func:`~attnkit.functional.registry.plain_choice`); ``None`` for any other call, which takes
    the full path with its validation and error messages.
    """
    if not _is_plain(query, key, value, is_causal, scale):
        return None
    unobserved = not (observe._OBSERVERS or observe._INTERCEPTORS)
    if unobserved and plain_choice(query.dtype, query.device, is_causal) == "sdpa":
        return _SDPA(query, key, value, None, 0.0, is_causal, scale=scale)
    scale = default_scale(query.shape[-1]) if scale is None else scale
    return AttentionSpec(query=query, key=key, value=value, is_causal=is_causal, scale=scale)


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window_size: int | tuple[int, int] | None = None,
    attn_bias: Tensor | None = None,
    alibi_slopes: Tensor | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    return_weights: bool = False,
    return_lse: bool = False,
    mask_mod: MaskMod | None = None,
    score_mod: ScoreMod | None = None,
    block_mask: BlockMask | None = None,
    sinks: Tensor | None = None,
    backend: str = "auto",
) -> Tensor | AttentionOutput:
    r"""Scaled dot-product attention: ``softmax(mask(softcap(scale · Q Kᵀ) + bias)) V``.

    Shape legend: ``B...`` any number of batch dims, ``H`` query heads, ``Hkv`` key/value heads (``H % Hkv == 0``),
    ``Lq`` query length, ``Lk`` key length, ``D`` head_dim, ``Dv`` value head_dim.

    For each query row ``i`` and key ``j`` the score is ``s = scale · q_i · k_j``; with ``softcap`` it becomes
    ``softcap · tanh(s / softcap)`` (Gemma 2); then ``attn_bias``, the ALiBi term and a float ``attn_mask`` are
    added, and keys removed by a bool ``attn_mask``, ``is_causal`` or ``window_size`` get ``-inf``. The softmax
    over ``j`` weights the values. It is equivalent to the following (the ``"math"`` backend)::

        s = softcap * tanh(scale * q @ k.mT / softcap)
        s = score_mod(s, b, h, i, j) + attn_bias + alibi + float_mask
        s = s.masked_fill(~(bool_mask & causal & window & mask_mod(b, h, i, j) & block_mask), -inf)
        p = softmax([s, sink], -1)[..., :-1]   # sink column dropped; rows with no key left: p = 0, not NaN
        out = dropout(p, dropout_p) @ v

    Alignment when ``Lq != Lk`` is **bottom-right** (FlashAttention >= 2.1; what a KV cache needs): query ``i``
    sits at key position ``i + Lk - Lq``, so it may attend key ``j`` iff ``j <= i + Lk - Lq`` (``is_causal``) and
    ``i + Lk - Lq - left <= j <= i + Lk - Lq + right`` (``window_size``). ``torch``'s SDPA ``is_causal`` is
    top-left aligned (``j <= i``); the two agree when ``Lq == Lk``. Example, ``Lq = 2``, ``Lk = 5``, causal::

        bottom-right (attnkit)    top-left (torch SDPA)
        1 1 1 1 0                 1 0 0 0 0
        1 1 1 1 1                 1 1 0 0 0

    Args:
        query: ``(B..., H, Lq, D)``; float64, float32, bfloat16 or float16.
        key: ``(B..., Hkv, Lk, D)``, same dtype and device. Query head ``h`` uses key/value head
            ``h // (H // Hkv)`` (grouped-query attention, Ainslie et al. 2023; multi-query when ``Hkv = 1``).
        value: ``(B..., Hkv, Lk, Dv)``.
        attn_mask: broadcastable to ``(B..., H, Lq, Lk)``; bool with **True = may attend** (SDPA's convention),
            or float added to the scores (``-inf`` removes a key). Default ``None``.
        is_causal: causal mask, bottom-right aligned. Default ``False``.
        window_size: sliding window, an int ``w`` = ``(w, w)`` or ``(left, right)`` keys on each side
            (inclusive; ``-1`` = unbounded), bottom-right aligned (Beltagy et al. 2020; FlashAttention's
            convention). ``(w, 0)`` with ``is_causal`` is Mistral's window. Default ``None``.
        attn_bias: float bias broadcastable to ``(B..., H, Lq, Lk)`` added to the scores (relative positions).
        alibi_slopes: ``(H,)`` or ``(B, H)``; adds ``-slope_h · |i + Lk - Lq - j|`` (Press et al. 2022,
            FlashAttention's convention); :func:`attnkit.masks.alibi_slopes` gives the paper's slopes.
        softcap: ``> 0``; scores become ``softcap · tanh(s / softcap)`` before masks and biases (Gemma 2).
        scale: multiplies ``Q Kᵀ``; default ``1 / sqrt(D)``.
        dropout_p: probability in ``[0, 1)`` of zeroing an attention probability (then rescaling by
            ``1 / (1 - p)``), applied whenever ``> 0`` as in SDPA: pass ``0.0`` at evaluation.
        return_weights: also return the probabilities ``(B..., H, Lq, Lk)`` (before dropout).
        return_lse: also return the log-sum-exp ``(B..., H, Lq)`` of the scaled, masked scores, in float32
            (float64 for float64 inputs; ``-inf`` for rows with no key to attend to). Differentiable on every
            backend (``auto`` avoids the fused CPU kernel, whose lse has no gradient, when gradients are needed).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool`` (FlexAttention's signature), True = may attend;
            combined with the other masks by "and". It is called on broadcastable int64 index tensors (``b``
            indexes the flattened batch dims, ``h`` the query head, ``q_idx``/``kv_idx`` absolute positions), one
            tile at a time by the tiled backends, so write it with elementwise tensor operations
            (``torch.where``, comparisons, indexing of captured tensors), not Python ``if``.
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (FlexAttention's signature), applied to
            the float32 score after ``softcap`` and before ``attn_bias``/ALiBi/masks, elementwise as
            ``mask_mod``. Gradients flow through it to ``score``; tensors it captures get gradients only on
            the ``"math"`` backend.
        block_mask: an :class:`attnkit.sparse.BlockMask` built for ``(Lq, Lk)``: a mask shared by every batch
            element and head, combined by "and"; the ``"blocksparse"`` backend skips its empty blocks.
        sinks: ``(H,)`` or ``(B..., H)`` attention-sink logits: one learned logit per head that joins every row's
            softmax with a zero value (Xiao et al. 2023; gpt-oss's ``s_aux``). Weights then sum to
            ``1 - sink mass``, ``lse`` includes the sink, and a row with no key left puts all its mass on the
            sink (output 0). Differentiable on every backend; merged through the lse
            (:func:`attnkit.functional.merge.add_sinks`).
        backend: ``"auto"`` (the fastest registered backend that supports the call; see
            :func:`attnkit.backends.select`) or a name from :func:`attnkit.backends.available`
            (``"math"``, ``"sdpa"``, ...).

    Returns:
        ``(B..., H, Lq, Dv)`` tensor in the dtype of ``value``; or, when ``return_weights`` or ``return_lse`` is
        set, an :class:`attnkit.AttentionOutput` ``(output, weights, lse)`` with the unrequested fields ``None``.
        A query row with no key left to attend to gives output 0, weights 0, lse ``-inf`` and zero gradients.
        In float16/bfloat16 the softmax is accumulated in float32. Empty calls (a zero batch dim, no heads,
        ``Lq = 0`` or ``Lk = 0``) return an empty (``Lk = 0``: zero) output on every backend.

    Raises:
        TypeError: a non-tensor or non-floating input, mixed dtypes, a mask of a non-bool non-float dtype.
        ValueError: wrong ranks, batch/head/head_dim sizes that do not match, ``H`` not a multiple of ``Hkv``,
            a mask or bias that does not broadcast to ``(B..., H, Lq, Lk)``, mixed devices, a window side below
            ``-1``, ``dropout_p`` outside ``[0, 1)``, ``softcap`` not a positive finite number, ``D = 0``, an
            unknown backend, or a named backend that cannot do an option of the call (the message names it).

    References:
        Vaswani et al. 2017, "Attention Is All You Need", Eq. 1. Masking/alignment semantics match
        FlashAttention's ``flash_attn_func`` (Dao 2023); bool mask semantics match
        ``torch.nn.functional.scaled_dot_product_attention``.

    Example:
        >>> import torch, attnkit
        >>> q = k = v = torch.randn(2, 4, 8, 16)
        >>> attnkit.attention(q, k, v, is_causal=True).shape
        torch.Size([2, 4, 8, 16])
    """
    plain = None
    if (
        backend == "auto"
        and attn_mask is None
        and window_size is None
        and attn_bias is None
        and alibi_slopes is None
        and softcap is None
        and dropout_p == 0.0
        and not (return_weights or return_lse)
        and mask_mod is None
        and score_mod is None
        and block_mask is None
        and sinks is None
    ):
        plain = _plain_call(query, key, value, is_causal, scale)
        if isinstance(plain, Tensor):
            return plain
    spec = plain
    if spec is None:
        spec = make_spec(
            query,
            key,
            value,
            attn_mask=attn_mask,
            is_causal=is_causal,
            window_size=window_size,
            attn_bias=attn_bias,
            alibi_slopes=alibi_slopes,
            softcap=softcap,
            scale=scale,
            dropout_p=dropout_p,
            return_weights=return_weights,
            return_lse=return_lse,
            mask_mod=mask_mod,
            score_mod=score_mod,
            block_mask=block_mask,
            sinks=sinks,
        )
    out, weights, lse = dispatch(spec, backend)
    if observe._OBSERVERS:
        observe.emit(observe.AttentionEvent("scaled_dot_product", spec, out, weights, lse))
    if not (return_weights or return_lse):
        return out
    return AttentionOutput(out, weights, lse)
