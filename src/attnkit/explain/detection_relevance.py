"""Relevance of each detection's decoder query (Chefer, Gur & Wolf 2021, the encoder-decoder / DETR case).

For a detection of class ``c`` from decoder query ``q`` the explained score is the class logit ``logits[q, c]``
of the last decoder layer. Every attention map ``A`` of the run and its gradient give ``Ā = mean_h((∇A ⊙ A)^+)``
(Eq. 5), and the rules of :func:`attnkit.explain.relevance.propagate_relevance` update, layer by layer in call
order, ``R^{qq}`` (queries for queries, starts as ``I``: decoder self-attention, Eq. 6) and ``R^{qi}`` (image
tokens for queries, starts as 0: ``R^{qi} += Ā R^{qi}`` after self-attention, ``R^{qi} += (R̄^{qq})ᵀ Ā R̄^{ii}``
after cross-attention, Eq. 7 and 10). Row ``q`` of ``R^{qi}`` is the detection's relevance over the image tokens.

**Image tokens** are the keys of the decoder's cross-attention: the flattened multi-level memory. ``R^{ii}`` comes
from self-attention over exactly those tokens where the model has it (DETR's encoder); otherwise it is ``I``
(attnkit's RT-DETR, whose encoder attends on the coarsest level only and then mixes levels with convolutions,
which the rules do not cover; Deformable DETR's deformable encoder, left out because its dense equivalent is
``S x S`` per head).

**Deformable cross-attention** (Deformable DETR, RT-DETR) has no dense map. Its output is linear in the values,
``o[q, h] = Σ_{l,k} w[q, h, l, k] · bilinear(v_h^l, p[q, h, l, k])``, which equals ``Σ_s A[q, h, s] v_h[s]`` with
``A[q, h] = Σ_{l,k} w[q, h, l, k] · splat(p[q, h, l, k])``: the sampling weights splatted bilinearly at the sampling
locations onto the cells of their level (:func:`~attnkit.explain.point_maps.splat_points`, the splatting of the
per-detection attention maps). This ``A`` is the attention map used here; its gradient is exact,
``∂y/∂A[q, h, s] = <∂y/∂o[q, h], v_h[s]>``, read from the module's own run (the model computes its usual
``grid_sample`` path), and the rules apply to it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain._detection import is_hf_deformable
from attnkit.explain._inputs import call_model
from attnkit.explain.capture import capture
from attnkit.explain.point_maps import dense_query_map, gaussian_blur, splat_points
from attnkit.explain.records import AttentionRecord
from attnkit.explain.relevance import _stream_of, propagate_relevance

__all__ = ["QueryRelevance", "deformable_attention_matrix", "query_relevance", "relevance_maps"]


@dataclass
class QueryRelevance:
    """What :func:`query_relevance` returns, one row per explained ``(query, label)``.

    Attributes:
        queries: ``(N,)`` int64 decoder query indices.
        labels: ``(N,)`` int64 explained classes.
        image: ``(N, S)`` float ``R^{qi}`` rows: relevance of the ``S`` image tokens (the decoder's memory,
            level by level, row-major) for each query.
        query: ``(N, Q)`` float ``R^{qq}`` rows: relevance of the decoder queries (identity included).
        spatial_shapes: ``(h_l, w_l)`` of the image-token levels when the model reported them (deformable
            attention), else ``None``.
        output: the model's output.
        records: the captured attention records (weights detached).
    """

    queries: Tensor
    labels: Tensor
    image: Tensor
    query: Tensor
    spatial_shapes: list[tuple[int, int]] | None
    output: Any = None
    records: list[AttentionRecord] = field(default_factory=list)


def deformable_attention_matrix(
    sampling_locations: Tensor, attention_weights: Tensor, spatial_shapes: Sequence[Sequence[int]]
) -> Tensor:
    """The dense attention map equivalent to deformable attention: weights splatted at their sampling locations.

    Args:
        sampling_locations: ``(B, H, Lq, NL, P, 2)`` normalised ``(x, y)`` (a ``"deformable"`` record's layout).
        attention_weights: ``(B, H, Lq, NL, P)``.
        spatial_shapes: ``NL`` pairs ``(h_l, w_l)``.

    Returns:
        ``(B, H, Lq, S)`` with ``S = sum(h_l * w_l)``, dtype of ``attention_weights``: ``A @ v_h`` equals the
        deformable output of head ``h`` (:func:`attnkit.vision.deformable.multi_scale_deformable_attention`).

    Raises:
        ValueError: shapes that do not agree.
    """
    shapes = [(int(h), int(w)) for h, w in spatial_shapes]
    if (
        sampling_locations.ndim != 6
        or sampling_locations.shape[:-1] != attention_weights.shape
        or sampling_locations.shape[3] != len(shapes)
    ):
        raise ValueError(
            f"deformable_attention_matrix: expected sampling_locations (B, H, Lq, NL={len(shapes)}, P, 2) and "
            f"attention_weights (B, H, Lq, NL, P), got {tuple(sampling_locations.shape)} and "
            f"{tuple(attention_weights.shape)}"
        )
    lead = attention_weights.shape[:3]
    p = attention_weights.shape[-1]
    levels = [
        splat_points(
            sampling_locations[..., lvl, :, :].reshape(-1, p, 2).to(attention_weights.dtype),
            attention_weights[..., lvl, :].reshape(-1, p),
            size,
        )
        for lvl, size in enumerate(shapes)
    ]
    return torch.cat(levels, -1).view(*lead, -1)


@dataclass
class _DeformableCall:
    """One deformable attention call: its output on the autograd graph, the per-head values and the map from
    the gradient of ``output`` to the gradient of the per-head mix ``o`` ``(B, Lq, H, D)``."""

    name: str
    output: Tensor
    value: Tensor  # (B, S, H, D), detached
    to_mix_grad: Callable[[Tensor], Tensor]


def _attnkit_hook(name: str, calls: list[_DeformableCall]):
    def hook(module, args, kwargs, out):
        got = dict(zip(("query", "value"), args))
        got.update(kwargs)
        value, mask = got["value"], got.get("key_padding_mask")
        with torch.no_grad():
            v = module.value_proj(value)
            if mask is not None:
                v = v.masked_fill(mask[..., None], 0.0)
        b, s = value.shape[:2]
        h, d = module.num_heads, module.head_dim
        weight = module.output_proj.weight.detach()
        tensor = out if isinstance(out, Tensor) else out.output
        calls.append(_DeformableCall(name, tensor, v.view(b, s, h, d), lambda g: (g @ weight).view(*g.shape[:2], h, d)))

    return hook


def _hf_hook(name: str, calls: list[_DeformableCall]):
    def hook(module, args, kwargs, out):
        value = args[0] if args else kwargs["value"]
        calls.append(_DeformableCall(name, out, value.detach(), lambda g: g.view(*g.shape[:2], *value.shape[-2:])))

    return hook


def _hook_deformable(model: nn.Module, calls: list[_DeformableCall]) -> list:
    from attnkit.vision.deformable import MultiScaleDeformableAttention

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, MultiScaleDeformableAttention):
            handles.append(module.register_forward_hook(_attnkit_hook(name, calls), with_kwargs=True))
        elif is_hf_deformable(module):
            handles.append(module.register_forward_hook(_hf_hook(name, calls), with_kwargs=True))
    return handles


def _default_logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor) and logits.ndim == 4:  # attnkit DetrOutput: (layers, B, Q, classes)
        logits = logits[-1]
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"query_relevance: cannot find (B, Q, classes) logits in the model output ({type(output).__name__}); "
            "pass logits=callable(output) -> (1, Q, classes)"
        )
    return logits


def _check_targets(targets, q: int, c: int) -> tuple[Tensor, Tensor]:
    t = torch.as_tensor(targets, dtype=torch.long)
    if t.ndim == 1 and t.numel() == 0:
        t = t.view(0, 2)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"query_relevance: expected targets as (N, 2) (query, label) pairs, got {tuple(t.shape)}")
    bad = (t[:, 0] < 0) | (t[:, 0] >= q) | (t[:, 1] < 0) | (t[:, 1] >= c)
    if bool(bad.any()):
        raise ValueError(
            f"query_relevance: targets must be (query in [0, {q}), label in [0, {c})) pairs, got {t[bad][0].tolist()}"
        )
    return t[:, 0], t[:, 1]


@dataclass
class _Entry:
    """One attention map for the rules: ``weights`` ``(B, H, Lq, Lk)`` detached; ``tracked`` the tensor on the
    autograd graph whose gradient ``to_grad`` turns into the gradient with respect to ``weights``."""

    name: str
    kind: str
    weights: Tensor
    tracked: Tensor
    to_grad: Callable[[Tensor], Tensor]
    spatial_shapes: list[tuple[int, int]] | None = None


def _deformable_entry(record: AttentionRecord, call: _DeformableCall) -> _Entry | None:
    """The dense equivalent of one decoder deformable call; ``None`` for encoder self-attention (``Lq == S``)."""
    shapes = [tuple(int(v) for v in s) for s in record.layout.extra["spatial_shapes"]]
    if record.shape[2] == call.value.shape[1]:
        return None
    a = deformable_attention_matrix(record.layout.extra["sampling_locations"], record.weights, shapes)
    value = call.value.to(a.dtype)

    def to_grad(g: Tensor) -> Tensor:
        return torch.einsum("bqhd,bshd->bhqs", call.to_mix_grad(g).to(a.dtype), value)

    return _Entry(call.name, "cross", a, call.output, to_grad, shapes)


def _collect(records: list[AttentionRecord], calls: list[_DeformableCall]) -> list[_Entry]:
    """Dense self/cross maps and decoder deformable calls that can reach the decoder's relevance, in call order."""
    deformable = [r for r in records if r.kind == "deformable"]
    if len(deformable) != len(calls):
        raise RuntimeError(
            f"query_relevance: {len(deformable)} deformable records but {len(calls)} hooked deformable calls"
        )
    pending = iter(calls)
    entries = []
    for r in records:
        if r.kind == "deformable":
            entry = _deformable_entry(r, next(pending))
            if entry is not None:
                entries.append(entry)
        elif r.kind in ("self", "cross") and r.weights is not None and r.weights.requires_grad:
            shape = r.shape
            entries.append(
                _Entry(r.name, r.kind, r.weights.detach().reshape(shape), r.weights, lambda g, s=shape: g.reshape(s))
            )
    # a self-attention over tokens that are neither queries nor keys of a cross-attention (attnkit RT-DETR's
    # coarsest-level encoder) cannot reach R^{qi} or R^{qq}: leave it out of the backward passes
    sizes = {n for e in entries if e.kind == "cross" for n in e.weights.shape[-2:]}
    return [e for e in entries if e.kind == "cross" or e.weights.shape[-1] in sizes]


def _run(model: nn.Module, inputs: Any) -> Any:
    if callable(inputs) and not isinstance(inputs, (Tensor, nn.Module)):
        return inputs()
    return call_model(model, inputs)


def query_relevance(
    model: nn.Module,
    inputs: Any,
    targets: Sequence[Sequence[int]] | Tensor | Callable[[Any], Any],
    *,
    logits: Callable[[Any], Tensor] | None = None,
) -> QueryRelevance:
    """Chefer et al.'s relevance of the image tokens (``R^{qi}``) and queries (``R^{qq}``) for decoder queries.

    Runs the model once inside :func:`capture` with ``differentiable=True``, with forward hooks on its
    deformable attention modules (attnkit's :class:`~attnkit.vision.MultiScaleDeformableAttention`, transformers'
    ``MultiScaleDeformableAttention``), then one backward pass per target. Call ``model.eval()`` first.

    Args:
        model: a DETR-family detector: attnkit's :class:`~attnkit.vision.detection.RTDETR` (pass
            ``inputs=lambda: model.forward_raw(images)``), or transformers' ``DetrForObjectDetection``
            (``attn_implementation="sdpa"``), ``DeformableDetrForObjectDetection``, ``RTDetrForObjectDetection``.
        inputs: one image's inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``), a tensor
            (``model(inputs)``) or a zero-argument callable that runs the model.
        targets: ``(N, 2)`` ``(query, label)`` pairs, or a callable ``output -> pairs`` (e.g. chosen from the
            detections of this very run).
        logits: ``output -> (1, Q, classes)`` logits whose entries are explained; default ``output.logits``
            (its last decoder layer for attnkit's ``DetrOutput``).

    Returns:
        a :class:`QueryRelevance`.

    Raises:
        TypeError: logits not found.
        ValueError: a batch of more than one image; targets of the wrong shape or out of range.
        RuntimeError: no cross-attention was seen (capture's message when no attention ran at all).

    References:
        Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
        Encoder-Decoder Transformers", ICCV, Eq. 5-11 (DETR, Sec. 4); deformable attention as a dense map: see the
        module docstring.
    """
    calls: list[_DeformableCall] = []
    handles = _hook_deformable(model, calls)
    try:
        with torch.enable_grad(), capture(model, differentiable=True) as rec:
            output = _run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    with torch.enable_grad():
        scores = (logits or _default_logits)(output)
    if not isinstance(scores, Tensor) or scores.ndim != 3 or scores.shape[0] != 1:
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"query_relevance: expected logits (1, Q, classes) of one image, got {got}")
    queries, labels = _check_targets(targets(output) if callable(targets) else targets, *scores.shape[1:])
    entries = _collect(rec.maps, calls)
    if not any(e.kind == "cross" for e in entries):
        raise RuntimeError(
            "query_relevance: no decoder cross-attention was captured (dense attention through attnkit or SDPA, "
            "or deformable attention modules)"
        )
    maps, kinds, names = [e.weights for e in entries], [e.kind for e in entries], [e.name for e in entries]
    needs = [e.tracked for e in entries if e.tracked.requires_grad]
    s = _stream_of(next(e.name for e in reversed(entries) if e.kind == "cross"))
    rows_i, rows_q = [], []
    for q, c in zip(queries.tolist(), labels.tolist()):
        got = iter(torch.autograd.grad(scores[0, q, c], needs, retain_graph=True, allow_unused=True))
        raw = [next(got) if e.tracked.requires_grad else None for e in entries]
        grads = [None if g is None else e.to_grad(g) for g, e in zip(raw, entries)]
        rel, order = propagate_relevance(maps, grads, kinds, names)
        keys = next(e.weights.shape[-1] for e in reversed(entries) if e.kind == "cross")
        image_stream = next(x for x in reversed(order) if x != s and rel[(s, x)].shape[-1] == keys)
        rows_i.append(rel[(s, image_stream)][0, q])
        rows_q.append(rel[(s, s)][0, q])
    shapes = next((e.spatial_shapes for e in reversed(entries) if e.spatial_shapes is not None), None)
    for m in rec.maps:
        if m.weights is not None:
            m.weights = m.weights.detach()
    empty = maps[-1].new_zeros(0, maps[-1].shape[-1])
    return QueryRelevance(
        queries=queries,
        labels=labels,
        image=torch.stack(rows_i) if rows_i else empty,
        query=torch.stack(rows_q) if rows_q else empty.new_zeros(0, scores.shape[1]),
        spatial_shapes=shapes,
        output=output,
        records=list(rec.maps),
    )


def relevance_maps(
    result: QueryRelevance,
    image_size: tuple[int, int],
    *,
    spatial_shapes: Sequence[Sequence[int]] | None = None,
    sigma: float = 0.0,
) -> Tensor:
    """``(N, Hi, Wi)`` float32 maps of :attr:`QueryRelevance.image` over the image pixels.

    Each level's relevance is spread evenly over the pixels of its cells
    (:func:`~attnkit.explain.point_maps.dense_query_map`, a density), then optionally smoothed.

    Args:
        result: what :func:`query_relevance` returned.
        image_size: ``(Hi, Wi)`` pixels the feature levels span (the padded input the model saw).
        spatial_shapes: ``(h_l, w_l)`` per level; default ``result.spatial_shapes`` (needed for dense-only
            models such as DETR, whose single level is the backbone's output grid).
        sigma: Gaussian smoothing in pixels; default 0.

    Raises:
        ValueError: level shapes unknown or not adding up to the number of image tokens.
    """
    shapes = spatial_shapes if spatial_shapes is not None else result.spatial_shapes
    if shapes is None:
        raise ValueError("relevance_maps: the level shapes are unknown; pass spatial_shapes=[(h, w), ...]")
    maps = dense_query_map(result.image, shapes, image_size)
    return gaussian_blur(maps, sigma) if len(maps) else maps
