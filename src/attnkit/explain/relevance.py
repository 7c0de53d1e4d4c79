"""Gradient-weighted attention relevance (Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability
for Interpreting Bi-Modal and Encoder-Decoder Transformers", ICCV).

Every attention map ``A`` (``(B, H, Lq, Lk)``) and the gradient of the explained score with respect to it give
``Ā = mean_h((∇A ⊙ A)^+)`` (Eq. 5). Token streams (an encoder's tokens, a decoder's tokens, ...) start with
``R^{ss} = I`` and ``R^{sx} = 0``; maps are applied in the order the model ran them:

* self-attention in stream ``s``: ``R^{sx} += Ā · R^{sx}`` for every stream ``x`` (Eq. 6, 7);
* cross-attention, queries from ``s``, keys from ``t``: ``R^{st} += (R̄^{ss})ᵀ · Ā · R̄^{tt}`` (Eq. 10) and
  ``R^{ss} += Ā · R^{ts}`` (Eq. 11), where ``R̄ = rownorm(R - I) + I`` (Eq. 8, 9).

Streams are told apart by module path: the part before the first layer index (``"encoder.layer"``,
``"decoder.layers"``); a cross-attention's key stream is the most recent other stream with as many tokens as
it has keys (or a fresh stream with ``R = I`` when no self-attention ran over those tokens).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain._inputs import call_model
from attnkit.explain.capture import capture
from attnkit.explain.records import AttentionRecord

__all__ = ["Relevance", "propagate_relevance", "relevance", "target_scores"]

_LAYER_INDEX = re.compile(r"\.\d+(\.|$)")


@dataclass
class Relevance:
    """What :func:`relevance` returns.

    Attributes:
        maps: ``{(s, x): (B, Ls, Lx)}`` relevance of stream ``x``'s input tokens for stream ``s``'s output
            tokens; ``maps[(s, s)]`` includes the identity (each token's own input).
        streams: stream names in order of first appearance.
        records: the captured maps (weights on the autograd graph are detached).
        output: the model's output.
    """

    maps: dict[tuple[str, str], Tensor]
    streams: list[str]
    records: list[AttentionRecord] = field(default_factory=list)
    output: Any = None

    def get(self, query_stream: str | None = None, key_stream: str | None = None) -> Tensor:
        """``(B, Lq, Lk)`` map of ``key_stream`` tokens for ``query_stream`` tokens.

        Defaults: the last stream that ran (where the output is usually read) and the first stream (the
        inputs); for an encoder alone both are the encoder.

        Raises:
            KeyError: an unknown stream (the message lists them).
        """
        q = self.streams[-1] if query_stream is None else query_stream
        k = self.streams[0] if key_stream is None else key_stream
        if (q, k) not in self.maps:
            raise KeyError(f"Relevance.get: no map for ({q!r}, {k!r}); streams: {self.streams}")
        return self.maps[(q, k)]


def _stream_of(name: str) -> str:
    m = _LAYER_INDEX.search(name)
    return name[: m.start()] if m else name


def _normalized(r: Tensor) -> Tensor:
    """``R̄ = rownorm(R - I) + I`` (Eq. 8-9); rows of ``R - I`` summing to 0 stay 0."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype, device=r.device)
    hat = r - eye
    total = hat.sum(-1, keepdim=True)
    return hat / torch.where(total != 0, total, torch.ones_like(total)) + eye


def propagate_relevance(
    maps: list[Tensor],
    grads: list[Tensor | None],
    kinds: list[str],
    names: list[str],
) -> tuple[dict[tuple[str, str], Tensor], list[str]]:
    """Chefer et al.'s relevance rules over attention maps and their gradients, in call order.

    Args:
        maps: ``(B, H, Lq, Lk)`` attention probabilities.
        grads: gradients of the explained score with respect to each map (``None``: no influence, zero).
        kinds: ``"self"`` or ``"cross"`` per map.
        names: module path per map (streams are derived from them, see the module docstring).

    Returns:
        ``(relevance maps {(s, x): (B, Ls, Lx)}, stream names)``.

    Raises:
        ValueError: lists of different lengths, or a self-attention map whose token count differs from its
            stream's.
    """
    if not (len(maps) == len(grads) == len(kinds) == len(names)):
        raise ValueError("propagate_relevance: maps, grads, kinds and names must have the same length")
    rel: dict[tuple[str, str], Tensor] = {}
    sizes: dict[str, int] = {}
    order: list[str] = []
    identity: set[str] = set()  # streams whose R^{ss} is still I (R̄ = I: skip the (L, L) normalisation)

    def ensure(stream: str, length: int, like: Tensor) -> None:
        if stream in sizes:
            if sizes[stream] != length:
                raise ValueError(
                    f"relevance: stream {stream!r} had {sizes[stream]} tokens, a map over it has {length} "
                    "(mismatched token counts)"
                )
            return
        sizes[stream] = length
        order.append(stream)
        identity.add(stream)
        b = like.shape[0]
        eye = torch.eye(length, dtype=like.dtype, device=like.device).expand(b, length, length).clone()
        rel[(stream, stream)] = eye
        for other in order[:-1]:
            rel[(stream, other)] = like.new_zeros(b, length, sizes[other])
            rel[(other, stream)] = like.new_zeros(b, sizes[other], length)

    for a, g, kind, name in zip(maps, grads, kinds, names):
        a = a.detach()
        g = torch.zeros_like(a) if g is None else g.detach()
        a_bar = (g * a).clamp_min(0).mean(1)  # (B, Lq, Lk), Eq. 5
        s = _stream_of(name)
        lq, lk = a.shape[-2], a.shape[-1]
        if kind == "self":
            ensure(s, lq, a_bar)
            if lq != lk:
                raise ValueError(f"relevance: self-attention {name!r} has Lq={lq} != Lk={lk}")
            for x in order:
                rel[(s, x)] = rel[(s, x)] + a_bar @ rel[(s, x)]
            identity.discard(s)
            continue
        ensure(s, lq, a_bar)
        candidates = [x for x in reversed(order) if x != s and sizes[x] == lk]
        t = candidates[0] if candidates else f"{name}:keys"
        ensure(t, lk, a_bar)
        right = a_bar if t in identity else a_bar @ _normalized(rel[(t, t)])
        rel[(s, t)] = rel[(s, t)] + _normalized(rel[(s, s)]).mT @ right
        rel[(s, s)] = rel[(s, s)] + a_bar @ rel[(t, s)]
        identity.discard(s)
    return rel, order


def target_scores(output: Any, target) -> Tensor:
    """The explained scores of a model output: ``target(output)``, or ``logits[b, target[b]]`` per item (see
    :func:`relevance`); shaped ``(B, 1)`` / as the callable returns. Raises as :func:`relevance`."""
    if callable(target):
        score = target(output)
    else:
        logits = output
        if not isinstance(logits, Tensor):
            logits = getattr(output, "logits", None)
            if logits is None and isinstance(output, (tuple, list)) and output:
                logits = output[0]
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"relevance: cannot find logits in the model output ({type(output).__name__}); pass "
                "target=callable(output) -> (B,) scores"
            )
        logits = logits.reshape(logits.shape[0], -1)
        idx = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(logits.shape[0])
        if idx.numel() != logits.shape[0] or bool((idx < 0).any() | (idx >= logits.shape[1]).any()):
            raise ValueError(
                f"relevance: target must be a class index in [0, {logits.shape[1]}) or one per batch item "
                f"(B={logits.shape[0]}), got {target!r}"
            )
        score = logits.gather(1, idx[:, None].to(logits.device))
    if not isinstance(score, Tensor):
        raise TypeError(f"relevance: the target callable must return a tensor, got {type(score).__name__}")
    return score


def _score(output: Any, target) -> Tensor:
    return target_scores(output, target).sum()


def relevance(
    model: nn.Module,
    inputs: Any,
    target: int | Tensor | Callable[[Any], Tensor],
) -> Relevance:
    """Explain ``model(inputs)`` with gradient-weighted attention relevance (Chefer et al. 2021).

    The model runs once inside :func:`capture` with ``differentiable=True`` (attention computed through
    explicit probabilities, so their gradients exist), then once backward. Works for encoders, decoders (causal
    self-attention) and encoder-decoder / bi-modal models with cross-attention. The model's mode (train/eval) is
    left as it is: call ``model.eval()`` first to explain inference.

    Args:
        model: the model; it must compute attention with attnkit, ``torch.nn.functional.
            scaled_dot_product_attention`` or ``nn.MultiheadAttention(need_weights=False)``.
        inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``) or one tensor (``model(inputs)``).
        target: the class to explain: an int, or a ``(B,)`` tensor of class indices, picked from the logits
            (the output tensor, ``output.logits``, or ``output[0]``, flattened to ``(B, -1)``); or a callable
            ``output -> (B,)`` scores for anything else (a token's logit in a decoder, a box score...).

    Returns:
        a :class:`Relevance`; ``result.get()`` is ``(B, L, L)`` for an encoder — row ``i`` explains output
        token ``i`` (a ViT's class token: ``result.get()[:, 0, prefix:]``).

    Raises:
        TypeError: logits not found, or a callable target that returns no tensor.
        ValueError: a bad target index; mismatched token counts.
        RuntimeError: no attention captured (see :func:`capture`), or the score does not depend on any
            attention map.

    References:
        Chefer, Gur & Wolf 2021, "Generic Attention-model Explainability for Interpreting Bi-Modal and
        Encoder-Decoder Transformers", ICCV, Eq. 5-11.
    """
    with torch.enable_grad():
        with capture(model, differentiable=True) as rec:
            output = call_model(model, inputs)
        records = [m for m in rec.maps if m.kind in ("self", "cross") and m.weights is not None]
        tracked = [m.weights for m in records if m.weights.requires_grad]
        if not tracked:
            raise RuntimeError("relevance: no captured attention map is on the autograd graph of the output")
        score = _score(output, target)
        grads_iter = iter(torch.autograd.grad(score, tracked, allow_unused=True))
        grads = [next(grads_iter) if m.weights.requires_grad else None for m in records]
    flat = [m.weights.detach().reshape(m.shape) for m in records]
    grads = [None if g is None else g.reshape(m.shape) for g, m in zip(grads, records)]
    maps, streams = propagate_relevance(flat, grads, [m.kind for m in records], [m.name for m in records])
    for m, w in zip(records, flat):
        m.weights = w
    return Relevance(maps=maps, streams=streams, records=records, output=output)
