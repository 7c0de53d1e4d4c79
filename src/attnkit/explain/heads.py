"""Head diagnostics: entropy, mean attention distance, and head importance by masking.

Shape legend: ``B`` batch, ``H`` heads, ``Lq``/``Lk`` query/key tokens, ``(Gh, Gw)`` patch grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain._inputs import call_model
from attnkit.explain._intercept import Interceptor
from attnkit.explain.capture import Recording
from attnkit.explain.records import AttentionRecord, TokenLayout, maps_of

__all__ = ["attention_distance", "head_entropy", "head_importance"]


def head_entropy(maps) -> Tensor:
    """Mean entropy of each head's query rows, ``-Σ_j A_ij log A_ij`` in nats.

    Args:
        maps: ``(B, H, Lq, Lk)`` tensors or records (one per layer), or a ``(layers, B, H, Lq, Lk)`` tensor.

    Returns:
        ``(layers, B, H)``: ``log Lk`` for uniform heads, 0 for heads that attend to one key.

    Raises:
        ValueError: no maps, or maps with different ``B``/``H`` that cannot be stacked.
    """
    tensors = maps_of(maps, who="head_entropy", square=False)

    def entropy(a: Tensor) -> Tensor:
        return -(a * torch.log(a.clamp_min(torch.finfo(a.dtype).tiny))).sum(-1).mean(-1)

    if len({a.shape for a in tensors}) == 1:  # every layer at once (a few kernels, not a few per layer)
        return entropy(maps if isinstance(maps, Tensor) else torch.stack(tensors, 0))
    return _stack([entropy(a) for a in tensors], "head_entropy")


def _stack(parts: list[Tensor], who: str) -> Tensor:
    if len({p.shape for p in parts}) > 1:
        raise ValueError(f"{who}: maps have different (B, H): {sorted({tuple(p.shape) for p in parts})}")
    return torch.stack(parts, 0)


def attention_distance(maps, *, layout: TokenLayout | None = None, unit: str = "tokens") -> Tensor:
    """Mean attention distance of each head: ``mean_i Σ_j A_ij · d(i, j)`` (Dosovitskiy et al. 2021, Fig. 7).

    Args:
        maps: self-attention maps ``(B, H, L, L)`` per layer (tensors or records), or ``(layers, B, H, L, L)``.
        layout: the token layout; default the records' own. Needed for ``unit="pixels"``.
        unit: ``"tokens"``: ``d = |i - j|`` over all tokens; ``"patches"`` / ``"pixels"``: Euclidean distance
            between patch centres on the grid, in patches or in pixels (``layout.patch_size``); prefix tokens
            (class, register) are left out of both queries and keys and each row is re-normalised over the
            patches (rows with no weight on patches count 0).

    Returns:
        ``(layers, B, H)`` mean distances (the unit asked for).

    Raises:
        ValueError: an unknown unit; ``"patches"``/``"pixels"`` without a grid (or pixel size) in the layout;
            a layout whose token count differs from the maps'; non-square maps.

    References:
        Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words", ICLR, Fig. 7 and Appendix D.7.
    """
    units = ("tokens", "patches", "pixels")
    if unit not in units:
        raise ValueError(f"attention_distance: unit must be one of {', '.join(map(repr, units))}, got {unit!r}")
    if layout is None and not isinstance(maps, Tensor):
        layout = next((m.layout for m in maps if isinstance(m, AttentionRecord) and m.layout is not None), None)
    tensors = maps_of(maps, who="attention_distance")
    length = tensors[0].shape[-1]
    if unit == "tokens":
        pos = torch.arange(length, dtype=tensors[0].dtype)
        dist = (pos[:, None] - pos[None, :]).abs()
        return _stack([(a * dist.to(a.device)).sum(-1).mean(-1) for a in tensors], "attention_distance")
    if layout is None or layout.grid is None:
        raise ValueError(f"attention_distance: unit={unit!r} needs a TokenLayout with a patch grid")
    if unit == "pixels" and layout.patch_size is None:
        raise ValueError("attention_distance: unit='pixels' needs TokenLayout.patch_size")
    layout.check_tokens(length, who="attention_distance")
    gh, gw = layout.grid
    ph, pw = layout.patch_size if unit == "pixels" else (1, 1)
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    ys, xs = yy.flatten().double() * ph, xx.flatten().double() * pw
    dist = ((ys[:, None] - ys[None, :]) ** 2 + (xs[:, None] - xs[None, :]) ** 2).sqrt()
    p = layout.num_prefix_tokens
    out = []
    for a in tensors:
        grid_a = a[..., p:, p:]
        total = grid_a.sum(-1, keepdim=True)
        grid_a = grid_a / torch.where(total > 0, total, torch.ones_like(total))
        out.append((grid_a * dist.to(a)).sum(-1).mean(-1))
    return _stack(out, "attention_distance")


def _scalar(score_fn: Callable[[Any], Tensor], output: Any) -> Tensor:
    score = score_fn(output)
    if not isinstance(score, Tensor):
        raise TypeError(f"head_importance: score must return a tensor, got {type(score).__name__}")
    return score.sum()


def head_importance(
    model: nn.Module,
    inputs: Any,
    score: Callable[[Any], Tensor],
    *,
    method: str = "gradient",
) -> Tensor:
    """Importance of every attention head, by masking it (Michel, Levy & Neubig 2019).

    Each head's output is multiplied by a gate ``ξ_h`` (1 leaves the model unchanged). ``"gradient"``:
    ``I_h = |∂ score / ∂ξ_h|`` at ``ξ = 1`` (Eq. 2, one forward and backward); ``"ablation"``:
    ``I_h = score(ξ = 1) - score(ξ_h = 0)``, one forward per head (Sec. 3: the drop when the head is masked).
    ``score`` is summed over the batch. Heads are gated where attnkit, ``torch.nn.functional.
    scaled_dot_product_attention`` or ``nn.MultiheadAttention(need_weights=False)`` computes them.

    Args:
        model: the model (its train/eval mode is left as is).
        inputs: a dict (``model(**inputs)``), tuple (``model(*inputs)``) or tensor (``model(inputs)``).
        score: ``output -> tensor`` whose sum is the quantity the heads are judged by (e.g. the log-probability
            of the right answer, or minus the loss).
        method: ``"gradient"`` or ``"ablation"``.

    Returns:
        ``(layers, H)`` float tensor (layers in :attr:`AttentionRecord.layer` order).

    Raises:
        ValueError: unknown method; layers with different head counts.
        RuntimeError: no attention computation was found in the model.
        TypeError: ``score`` returned no tensor.

    References:
        Michel, Levy & Neubig 2019, "Are Sixteen Heads Really Better than One?", NeurIPS, Sec. 3-4, Eq. 2.
    """
    if method not in ("gradient", "ablation"):
        raise ValueError(f"head_importance: method must be 'gradient' or 'ablation', got {method!r}")
    gates: dict[int, Tensor] = {}

    def gate_for(layer: int, num_heads: int) -> Tensor:
        if layer not in gates:
            gates[layer] = torch.ones(num_heads, dtype=torch.float64, requires_grad=method == "gradient")
        return gates[layer]

    def forward() -> Tensor:
        rec = Recording()
        icpt = Interceptor(model, rec, head_gates=gate_for)  # gates heads, stores no maps
        with torch.enable_grad(), icpt:  # grad on: keeps nn.TransformerEncoderLayer off its native fast path
            value = _scalar(score, call_model(model, inputs))
        if rec.num_calls == 0:
            raise RuntimeError(
                "head_importance: no attention computation ran inside the model (see attnkit.explain.capture)"
            )
        return value

    base = forward()
    heads = {layer: g.numel() for layer, g in gates.items()}
    if len(set(heads.values())) > 1:
        raise ValueError(f"head_importance: layers have different head counts {heads}")
    layers = sorted(gates)
    if method == "gradient":
        grads = torch.autograd.grad(base, [gates[layer] for layer in layers], allow_unused=True)
        return torch.stack(
            [torch.zeros(heads[layer]) if g is None else g.abs().float() for layer, g in zip(layers, grads)]
        )
    out = torch.zeros(len(layers), heads[layers[0]])
    with torch.no_grad():
        for li, layer in enumerate(layers):
            for h in range(heads[layer]):
                for g in gates.values():
                    g.fill_(1.0)
                gates[layer][h] = 0.0
                out[li, h] = float(base.detach() - forward().detach())
    return out
