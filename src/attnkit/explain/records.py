"""What :func:`attnkit.explain.capture` records: one :class:`AttentionRecord` per attention computation.

Shape legend: ``B`` batch, ``H`` heads, ``Lq`` query length, ``Lk`` key length, ``(Gh, Gw)`` patch grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["AttentionRecord", "TokenLayout", "layout_from_dict", "maps_of"]


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of an attention map come from, so methods never guess.

    Attributes:
        num_prefix_tokens: tokens before the patches/words that are not part of the grid (class,
            distillation, register tokens). The class token, when there is one, is token 0.
        grid: ``(Gh, Gw)`` patch grid of an image model (non-square allowed), or ``None`` for text. The grid
            tokens follow the prefix tokens in row-major order.
        patch_size: ``(ph, pw)`` pixels per patch, for distances in pixels; ``None`` if unknown.
        window: ``(wh, ww)`` window size in patches for Swin-style models whose maps cover one window each,
            or ``None``.
        extra: anything else a producer reported.
    """

    num_prefix_tokens: int = 0
    grid: tuple[int, int] | None = None
    patch_size: tuple[int, int] | None = None
    window: tuple[int, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int | None:
        """Tokens per map: ``num_prefix_tokens + Gh * Gw`` (``wh * ww`` per window for windowed maps), or
        ``None`` for layouts without a grid."""
        if self.window is not None:
            return self.num_prefix_tokens + self.window[0] * self.window[1]
        if self.grid is None:
            return None
        return self.num_prefix_tokens + self.grid[0] * self.grid[1]

    def check_tokens(self, num_tokens: int, *, who: str) -> None:
        """Raise ValueError if an image layout does not account for exactly ``num_tokens`` tokens."""
        expected = self.num_tokens
        if expected is not None and expected != num_tokens:
            raise ValueError(
                f"{who}: the token layout (num_prefix_tokens={self.num_prefix_tokens}, grid={self.grid}) "
                f"describes {expected} tokens, but the maps have {num_tokens}"
            )


@dataclass
class AttentionRecord:
    """One attention computation seen inside the captured model.

    Attributes:
        name: module path of the innermost module that ran it (``"encoder.layer.3.attention.self"``;
            ``""`` for the root module).
        layer: index of the attention module among those that produced attention, in order of first call
            (for a BERT or ViT encoder: the block index).
        call: index of this computation among all intercepted ones (call order; includes filtered ones).
        kind: ``"self"`` or ``"cross"`` for token attention; ``"channel"`` / ``"spatial"`` for gate maps of
            :mod:`attnkit.vision` modules.
        source: ``"attnkit"``, ``"sdpa"`` (``torch.nn.functional.scaled_dot_product_attention``) or
            ``"nn.MultiheadAttention"``.
        shape: ``(B, H, Lq, Lk)`` of the full map (gate maps: the shape of ``weights``).
        weights: the stored probabilities, float32 (float64 for float64 models): ``(B, H', Lq', Lk)`` where
            ``H'`` is the selected heads (1 with ``head_mean``) and ``Lq'`` the selected query rows; ``None``
            when only reducers were asked for (``store=False``). Batch dims beyond one are flattened into ``B``.
        heads: the head indices kept in ``weights`` (``None``: all heads; with ``head_mean`` they are the heads
            averaged).
        query_rows: the query rows kept in ``weights`` (``None``: all).
        head_mean: ``weights`` is the mean over ``heads``.
        layout: the token layout, when known.
    """

    name: str
    layer: int
    call: int
    kind: str
    source: str
    shape: tuple[int, ...]
    weights: Tensor | None = None
    heads: tuple[int, ...] | None = None
    query_rows: tuple[int, ...] | None = None
    head_mean: bool = False
    layout: TokenLayout | None = None

    @property
    def is_self(self) -> bool:
        """True for self-attention (queries and keys from the same tokens)."""
        return self.kind == "self"

    def __repr__(self) -> str:
        w = None if self.weights is None else tuple(self.weights.shape)
        return (
            f"AttentionRecord(name={self.name!r}, layer={self.layer}, kind={self.kind!r}, source={self.source!r}, "
            f"shape={self.shape}, weights={w})"
        )


def maps_of(maps, *, who: str, square: bool = True) -> list[Tensor]:
    """Normalize ``maps`` (records, tensors, or a stacked tensor) to a list of ``(B, H, Lq, Lk)`` tensors.

    Args:
        maps: a list of :class:`AttentionRecord` (token kinds only) or ``(B, H, Lq, Lk)`` / ``(H, Lq, Lk)``
            tensors, or one ``(layers, B, H, Lq, Lk)`` tensor.
        who: function name for error messages.
        square: require ``Lq == Lk`` equal in every map (self-attention over one token set).

    Raises:
        TypeError: an element is neither a tensor nor a record.
        ValueError: empty input, a record without stored weights or with selected query rows, wrong ranks, or
            (``square``) maps of mismatched token counts.
    """
    if isinstance(maps, Tensor):
        if maps.ndim != 5:
            raise ValueError(
                f"{who}: expected a (layers, B, H, L, L) tensor or a list of maps, got {tuple(maps.shape)}"
            )
        maps = list(maps.unbind(0))
    maps = list(maps)
    if not maps:
        raise ValueError(f"{who}: got no attention maps; did the capture record anything?")
    out: list[Tensor] = []
    for i, m in enumerate(maps):
        if isinstance(m, AttentionRecord):
            if m.kind not in ("self", "cross"):
                raise ValueError(f"{who}: map {i} ({m.name!r}) is a {m.kind!r} gate map, not token attention")
            if m.weights is None:
                raise ValueError(f"{who}: record {i} ({m.name!r}) holds no weights (captured with store=False)")
            if m.query_rows is not None:
                raise ValueError(
                    f"{who}: record {i} ({m.name!r}) kept only query rows {m.query_rows[:8]}...; capture all rows"
                )
            m = m.weights
        if not isinstance(m, Tensor):
            raise TypeError(f"{who}: expected maps of tensors or AttentionRecords, got {type(m).__name__} at {i}")
        if m.ndim == 3:
            m = m.unsqueeze(0)
        if m.ndim != 4:
            raise ValueError(f"{who}: expected map {i} of shape (B, H, Lq, Lk), got {tuple(m.shape)}")
        out.append(m)
    if square:
        first = out[0].shape
        for i, m in enumerate(out):
            if m.shape[-1] != m.shape[-2] or m.shape[-1] != first[-1] or m.shape[0] != first[0]:
                raise ValueError(
                    f"{who}: maps must be (B, H, L, L) with one B and L for all layers; map 0 is "
                    f"{tuple(first)}, map {i} is {tuple(m.shape)} (mismatched token counts or cross-attention)"
                )
    return out


def layout_from_dict(d: dict) -> TokenLayout | None:
    """A :class:`TokenLayout` from a producer's layout dict (``num_prefix_tokens``, ``grid``, ``patch_size``,
    ``window``/``window_size``; other keys go to ``extra``), or ``None`` for an empty dict."""
    if not d:
        return None
    known: dict[str, Any] = {}
    if "num_prefix_tokens" in d:
        known["num_prefix_tokens"] = int(d["num_prefix_tokens"])
    for key, src in (("grid", "grid"), ("patch_size", "patch_size"), ("window", "window"), ("window", "window_size")):
        v = d.get(src)
        if v is not None and key not in known:
            known[key] = (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)[:2]
    used = {"num_prefix_tokens", "grid", "patch_size", "window", "window_size"}
    return TokenLayout(**known, extra={k: v for k, v in d.items() if k not in used})
