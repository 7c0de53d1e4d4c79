"""Hypothesis strategies drawing attention calls: shapes, head groupings, masks, windows, biases, layouts."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st


@dataclass
class AttentionCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    non_contiguous: bool = False

    def tensors(self, dtype=torch.float64, requires_grad=False):
        def prep(t):
            t = t.to(dtype)
            if self.non_contiguous:  # same values, transposed storage
                t = t.transpose(-1, -2).contiguous().transpose(-1, -2)
            return t.requires_grad_(requires_grad)

        kwargs = {}
        for name, val in self.kwargs.items():
            if isinstance(val, torch.Tensor) and val.dtype.is_floating_point and name not in ("alibi_slopes",):
                val = val.to(dtype if name == "attn_mask" else torch.float32 if dtype != torch.float64 else dtype)
            kwargs[name] = val
        return prep(self.q), prep(self.k), prep(self.v), kwargs

    def __repr__(self):
        shapes = f"q{tuple(self.q.shape)} k{tuple(self.k.shape)} v{tuple(self.v.shape)}"
        opts = {n: (tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else v for n, v in self.kwargs.items()}
        return f"AttentionCase({shapes}, {opts}, non_contiguous={self.non_contiguous})"


def _broadcast_shape(draw, full):
    """A shape that broadcasts to ``full``: each dim kept or 1, leading dims possibly dropped."""
    dims = [n if draw(st.booleans()) else 1 for n in full]
    drop = draw(st.integers(0, max(0, len(full) - 2)))
    return dims[drop:]


@st.composite
def attention_case(draw, *, max_len=17, options=None, extras=False):
    """Draw an :class:`AttentionCase`; ``options`` (backend option names) restricts what may be drawn.

    ``extras`` also draws the options beyond the dense reference's first set: ``mask_mod``, ``score_mod``,
    ``block_mask`` (small blocks) and ``sinks``.
    """

    def allowed(name):
        return options is None or name in options

    batch = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    H = draw(st.sampled_from([1, 2, 3, 4, 6]))
    Hkv = draw(st.sampled_from([d for d in range(1, H + 1) if H % d == 0])) if allowed("gqa") else H
    Lq = draw(st.integers(1, max_len))
    Lk = draw(st.integers(1, max_len))
    D = draw(st.integers(1, 16))
    Dv = draw(st.sampled_from([D, draw(st.integers(1, 12))]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(*batch, H, Lq, D, generator=g, dtype=torch.float64)
    k = torch.randn(*batch, Hkv, Lk, D, generator=g, dtype=torch.float64)
    v = torch.randn(*batch, Hkv, Lk, Dv, generator=g, dtype=torch.float64)
    full = [*batch, H, Lq, Lk]
    kwargs = {}
    kinds = ["none"] + [k for k in ("bool", "float") if allowed(f"attn_mask_{k}")]
    mask_kind = draw(st.sampled_from(kinds))
    if mask_kind != "none":
        shape = _broadcast_shape(draw, full)
        keep = torch.rand(*shape, generator=g) < draw(st.sampled_from([0.2, 0.6, 0.95]))
        if mask_kind == "bool":
            kwargs["attn_mask"] = keep
        else:
            kwargs["attn_mask"] = torch.randn(*shape, generator=g, dtype=torch.float64).masked_fill(~keep, -torch.inf)
    if allowed("is_causal") and draw(st.booleans()):
        kwargs["is_causal"] = True
    window = draw(
        st.one_of(
            st.none(),
            st.integers(0, 5),
            st.tuples(st.integers(-1, 5), st.integers(-1, 5)),
        )
    )
    if window is not None and allowed("window_size"):
        kwargs["window_size"] = window
    if allowed("attn_bias") and draw(st.booleans()):
        kwargs["attn_bias"] = torch.randn(*_broadcast_shape(draw, full), generator=g, dtype=torch.float64)
    alibi = draw(st.sampled_from(["none", "heads", "batch"] if batch else ["none", "heads"]))
    if alibi != "none" and allowed("alibi_slopes"):
        shape = [H] if alibi == "heads" else [*batch, H]
        kwargs["alibi_slopes"] = torch.rand(*shape, generator=g) * 0.5
    if allowed("softcap") and draw(st.booleans()):
        kwargs["softcap"] = draw(st.floats(0.5, 20.0))
    if draw(st.booleans()):
        kwargs["scale"] = draw(st.floats(0.05, 2.0))
    if extras:
        _draw_extras(draw, g, kwargs, allowed, batch, H, Lq, Lk)
    return AttentionCase(q, k, v, kwargs, non_contiguous=draw(st.booleans()))


def _draw_extras(draw, g, kwargs, allowed, batch, H, Lq, Lk):
    from attnkit.sparse import BlockMask

    if allowed("mask_mod") and draw(st.booleans()):
        table = torch.rand(H, Lq, Lk, generator=g) < draw(st.sampled_from([0.3, 0.8]))
        kwargs["mask_mod"] = lambda b, h, q_idx, kv_idx: table[h, q_idx, kv_idx]
    if allowed("score_mod") and draw(st.booleans()):
        bias = torch.randn(H, Lq, Lk, generator=g, dtype=torch.float64)
        kwargs["score_mod"] = lambda score, b, h, q_idx, kv_idx: score + bias[h, q_idx, kv_idx].to(score.dtype)
    if allowed("block_mask") and draw(st.booleans()):
        dense = torch.rand(Lq, Lk, generator=g) < draw(st.sampled_from([0.3, 0.8]))
        kwargs["block_mask"] = BlockMask.from_dense(dense, block_size=draw(st.sampled_from([2, 4, 16])))
    if draw(st.booleans()):
        shape = [H] if not batch or draw(st.booleans()) else [*batch, H]
        kwargs["sinks"] = torch.randn(*shape, generator=g, dtype=torch.float64)
