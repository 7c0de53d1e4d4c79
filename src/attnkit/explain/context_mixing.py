"""Context mixing: how much each token's representation draws on each other token, accounting for the values.

* :func:`attention_norms` (Kobayashi et al. 2020, "Attention is Not Only a Weight: Analyzing Transformers with
  Vector Norms", EMNLP, Sec. 3, Eq. 5-7): a self-attention output is ``Σ_j Σ_h α^h_ij f^h(x_j) + b_O`` with
  ``f^h(x) = (x W_V^h + b_V^h) W_O^h``; the contribution of token ``j`` to token ``i`` is the norm
  ``||α^h_ij f^h(x_j)||`` per head, ``||Σ_h α^h_ij f^h(x_j)||`` for the layer.
* :func:`value_zeroing` (Mohebbi, Zuidema, Chrupała & Alishahi 2023, "Quantifying Context Mixing in
  Transformers", EACL, Sec. 2, Eq. 2-3): the value vector of token ``j`` is set to zero in every head and the
  whole layer is run again; ``C_ij = 1 - cos(x̃_i^{¬j}, x̃_i)``, the cosine distance of token ``i``'s layer
  output with and without ``j``'s value.

Both work on models built from :class:`attnkit.nn.MultiHeadAttention` self-attention (its ``v_proj`` and
``out_proj``), e.g. :class:`attnkit.models.BertModel`, :class:`attnkit.vision.VisionTransformer` and any stack of
:class:`attnkit.nn.TransformerEncoderLayer`; cross-attention calls are left out. The attention probabilities come
from :func:`attnkit.explain.capture` (the core's one definition of attention). :meth:`ContextMixing.rollout`
aggregates the layers (Abnar & Zuidema 2020) after normalising each row to sum to 1.

Shape legend: ``B`` batch, ``H`` heads, ``L`` tokens, ``E`` embed_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain._inputs import call_model
from attnkit.explain.capture import capture
from attnkit.explain.rollout import rollout
from attnkit.nn.encoder_layer import TransformerEncoderLayer
from attnkit.nn.multihead import MultiHeadAttention

__all__ = ["ContextMixing", "attention_norms", "mixing_vectors", "value_zeroing"]


@dataclass
class ContextMixing:
    """Per-layer context-mixing scores (layers in the order they ran).

    Attributes:
        maps: ``(layers, B, L, L)`` scores, row ``i`` = how much token ``i``'s output draws on each token ``j``
            (unnormalised: norms in the units of the hidden states, or cosine distances in ``[0, 2]``).
        heads: ``(layers, B, H, L, L)`` per-head norms (:func:`attention_norms`), or ``None``.
        names: module path of each layer's attention.
        method: ``"attention_norm"`` or ``"value_zeroing"``.
    """

    maps: Tensor
    heads: Tensor | None
    names: list[str]
    method: str

    def normalized(self) -> Tensor:
        """``(layers, B, L, L)`` with each row divided by its sum (rows summing to 0 stay 0)."""
        total = self.maps.sum(-1, keepdim=True)
        return self.maps / torch.where(total > 0, total, torch.ones_like(total))

    def rollout(self, *, residual: bool | None = None) -> Tensor:
        """``(B, L, L)`` rollout (:func:`attnkit.explain.rollout`) of the row-normalised maps.

        Args:
            residual: add the identity for the residual connection (``0.5 · A + 0.5 · I``); default ``True``
                for attention norms (attention alone, as Abnar & Zuidema's rollout), ``False`` for value
                zeroing, whose scores are measured on the layer output and so include the residual path
                (Mohebbi et al. 2023, Sec. 4).
        """
        if residual is None:
            residual = self.method == "attention_norm"
        return rollout(self.normalized().unsqueeze(2), residual=residual)


def _attention_modules(model: nn.Module, who: str) -> dict[nn.Module, str]:
    found = {m: name for name, m in model.named_modules() if isinstance(m, MultiHeadAttention)}
    if not found:
        raise ValueError(
            f"{who}: {type(model).__name__} has no attnkit.nn.MultiHeadAttention; context mixing needs its "
            "v_proj/out_proj (BertModel, VisionTransformer and TransformerEncoderLayer stacks have them)"
        )
    return found


def mixing_vectors(weights: Tensor, value_input: Tensor, attn: MultiHeadAttention) -> Tensor:
    """``(B, H, L, S, E)``: the vectors ``α^h_ij f^h(x_j)`` whose sum over ``h`` and ``j`` plus ``out_proj``'s
    bias is the attention output (Kobayashi et al. 2020, Eq. 5-6).

    Args:
        weights: ``(B, H, L, S)`` attention probabilities of ``attn``.
        value_input: ``(B, S, vdim)``: the ``value`` input of ``attn`` (batch first).
        attn: the module (its ``v_proj``, ``out_proj``, and ``num_kv_heads`` for grouped heads).
    """
    h = weights.shape[1]
    d = attn.head_dim
    v = attn.v_proj(value_input).unflatten(-1, (attn.num_kv_heads, d)).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.repeat_interleave(h // attn.num_kv_heads, dim=1)  # (B, H, S, D)
    w_o = attn.out_proj.weight.unflatten(1, (h, d))  # (E, H, D)
    f = torch.einsum("bhsd,ehd->bhse", v, w_o)  # f^h(x_j): (B, H, S, E)
    return weights.to(f.dtype).unsqueeze(-1) * f.unsqueeze(2)  # (B, H, L, S, E)


def attention_norms(model: nn.Module, inputs: Any) -> ContextMixing:
    """Norm-based context mixing ``||α^h_ij f^h(x_j)||`` (Kobayashi et al. 2020) of every self-attention layer.

    Args:
        model: the model (call ``model.eval()`` first; dropout would change the weights).
        inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``) or one tensor.

    Returns:
        :class:`ContextMixing` with ``maps`` = ``||Σ_h α^h_ij f^h(x_j)||`` ``(layers, B, L, L)`` and ``heads`` =
        ``||α^h_ij f^h(x_j)|| = α^h_ij ||f^h(x_j)||`` ``(layers, B, H, L, L)``, float32 (float64 models: float64).
        Padded keys (probability 0) score 0.

    Raises:
        ValueError: the model has no :class:`attnkit.nn.MultiHeadAttention`, or ran no self-attention through
            one.
        RuntimeError: no attention computation ran (see :func:`capture`).

    References:
        Kobayashi, Kuribayashi, Yokoi & Inui 2020, EMNLP, Sec. 3 (Eq. 5-7).
    """
    modules = _attention_modules(model, "attention_norms")
    inputs_seen: list[tuple[str, Tensor]] = []

    def keep(module, args, kwargs):
        query = args[0] if args else kwargs["query"]
        key = args[1] if len(args) > 1 else kwargs.get("key")
        value = args[2] if len(args) > 2 else kwargs.get("value")
        if (key is None or key is query) and (value is None or value is query):
            x = query if module.batch_first or query.ndim == 2 else query.transpose(0, 1)
            inputs_seen.append((modules[module], x if x.ndim == 3 else x.unsqueeze(0)))

    handles = [m.register_forward_pre_hook(keep, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad(), capture(model) as rec:
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    by_name = {m.name: m for m in rec.maps if m.kind == "self"}
    maps, heads, names = [], [], []
    named = {name: m for m, name in modules.items()}
    with torch.no_grad():
        for name, x in inputs_seen:
            record = by_name.get(name)
            if record is None or record.weights is None:
                continue
            attn = named[name]
            vec = mixing_vectors(record.weights, x.to(attn.v_proj.weight.dtype), attn)
            heads.append(vec.norm(dim=-1))
            maps.append(vec.sum(1).norm(dim=-1))
            names.append(name)
    if not maps:
        raise ValueError("attention_norms: no self-attention ran through an attnkit.nn.MultiHeadAttention")
    return ContextMixing(torch.stack(maps), torch.stack(heads), names, "attention_norm")


def _zeroed_rows(x: Tensor, kwargs: dict, layer: TransformerEncoderLayer, positions: Tensor) -> Tensor:
    """Layer outputs ``(n, B, L, E)`` with the value of token ``positions[k]`` zeroed in replica ``k``."""
    n, (b, length, _) = len(positions), x.shape
    rep = {
        k: (v.repeat(n, *([1] * (v.ndim - 1))) if isinstance(v, Tensor) and v.shape[:1] == (b,) else v)
        for k, v in kwargs.items()
    }

    def zero(_module, _args, out):
        drop = torch.zeros(n, 1, length, 1, dtype=torch.bool, device=out.device)
        drop[torch.arange(n), 0, positions] = True
        return out.unflatten(0, (n, b)).masked_fill(drop, 0.0).flatten(0, 1)

    handle = layer.self_attn.v_proj.register_forward_hook(zero)
    try:
        return layer(x.repeat(n, 1, 1), **rep).unflatten(0, (n, b))
    finally:
        handle.remove()


def value_zeroing(model: nn.Module, inputs: Any, *, chunk_size: int = 32) -> ContextMixing:
    """Value-zeroing context mixing (Mohebbi et al. 2023) of every :class:`attnkit.nn.TransformerEncoderLayer`.

    For layer ``l`` with input ``x`` and output ``x̃``: ``C_ij = 1 - cos(x̃_i^{¬j}, x̃_i)``, where ``x̃^{¬j}``
    is the layer rerun on the same input with token ``j``'s value vector zeroed in every head (the residual,
    normalisation and feed-forward parts run as usual). ``L + 1`` runs of each layer, ``chunk_size`` zeroed
    tokens per batched run.

    Args:
        model: the model (call ``model.eval()`` first); the layers must be batch-first.
        inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``) or one tensor.
        chunk_size: tokens zeroed per batched layer run (memory ``chunk_size · B · L · E``).

    Returns:
        :class:`ContextMixing` with ``maps`` ``(layers, B, L, L)`` cosine distances and ``heads=None``.

    Raises:
        ValueError: no :class:`attnkit.nn.TransformerEncoderLayer` ran inside the model, a layer that is not
            batch-first, or a bad ``chunk_size``.

    References:
        Mohebbi, Zuidema, Chrupała & Alishahi 2023, "Quantifying Context Mixing in Transformers", EACL, Sec. 2
        (Eq. 2-3).
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"value_zeroing: chunk_size must be a positive int, got {chunk_size!r}")
    layers = {m: name for name, m in model.named_modules() if isinstance(m, TransformerEncoderLayer)}
    seen: list[tuple[TransformerEncoderLayer, Tensor, dict, Tensor]] = []

    def keep(module, args, kwargs, out):
        if kwargs.get("kv_cache") is not None:
            raise ValueError("value_zeroing: layers run with a kv_cache are not supported")
        if not module.self_attn.batch_first:
            raise ValueError(f"value_zeroing: layer {layers[module]!r} is not batch-first")
        seen.append((module, args[0] if args else kwargs["x"], {k: v for k, v in kwargs.items() if k != "x"}, out))

    handles = [m.register_forward_hook(keep, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    maps = []
    with torch.no_grad():
        for layer, x, kwargs, out in seen:
            length = x.shape[1]
            parts = []
            for start in range(0, length, chunk_size):
                positions = torch.arange(start, min(start + chunk_size, length), device=x.device)
                zeroed = _zeroed_rows(x, kwargs, layer, positions)  # (n, B, L, E)
                parts.append(1 - torch.nn.functional.cosine_similarity(zeroed, out.unsqueeze(0), dim=-1))
            maps.append(torch.cat(parts, 0).permute(1, 2, 0).clamp_min(0))  # (j, B, i) -> (B, i, j)
    if not maps:
        raise ValueError(f"value_zeroing: no attnkit.nn.TransformerEncoderLayer ran inside {type(model).__name__}")
    return ContextMixing(torch.stack(maps), None, [layers[layer] for layer, *_ in seen], "value_zeroing")


#: Context-mixing methods by name (``model, inputs -> ContextMixing``).
CONTEXT_MIXING: dict[str, Callable[[nn.Module, Any], ContextMixing]] = {
    "attention_norm": attention_norms,
    "value_zeroing": value_zeroing,
}
