"""Attention probabilities recomputed on the side from a call's inputs, in query-row tiles.

The model keeps its own (fused) kernel; these helpers rebuild ``softmax(mask(scale · Q Kᵀ) + bias)`` for the
selected heads and query rows only, ``_TILE_ELEMENTS`` scores at a time, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from attnkit.functional.spec import AttentionSpec, make_spec
from attnkit.functional.tiles import TileIndex, TileSetup, reshape_qkv

__all__ = ["probability_tiles", "select_index", "select_weights", "spec_from_sdpa", "unfold_packed_gqa"]

#: Scores per tile (float32): 2**24 = 64 MiB.
_TILE_ELEMENTS = 1 << 24


def spec_from_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """An :class:`AttentionSpec` with the semantics of one ``torch.nn.functional.scaled_dot_product_attention`` call.

    torch's ``is_causal`` is top-left aligned; attnkit's is bottom-right, so for ``Lq != Lk`` the causal mask is
    passed as an explicit bool mask. ``enable_gqa`` maps query head ``h`` to key head ``h // (H // Hkv)`` in
    both libraries.
    """
    lq, lk = query.shape[-2], key.shape[-2]
    if is_causal and lq != lk:
        tril = torch.ones(lq, lk, dtype=torch.bool, device=query.device).tril()
        attn_mask = (
            tril
            if attn_mask is None
            else (attn_mask & tril if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~tril, float("-inf")))
        )
        is_causal = False
    return make_spec(query, key, value, attn_mask=attn_mask, is_causal=bool(is_causal), scale=scale)


def unfold_packed_gqa(module, query: Tensor, key: Tensor, attn_mask: Tensor | None):
    """Recognise Hugging Face's packed grouped-query layout of a one-token step, and undo it.

    For a single query token with grouped-query attention and a mask, transformers (``pack_gqa`` in
    ``integrations/sdpa_attention.py``) calls SDPA with the ``G`` query heads of each key/value head folded
    into the query axis: query ``(B, Hkv, G, D)`` against key ``(B, Hkv, Lk, D)``. The module tells: it has
    ``num_key_value_groups = G > 1`` and ``config.num_attention_heads = H = Hkv · G``.

    Returns:
        ``(query (B, H, 1, D), attn_mask)`` with the heads restored (mask ``(B, Hkv, G, Lk)`` likewise), or
        ``None`` when the call is not packed.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    heads = getattr(getattr(module, "config", None), "num_attention_heads", None)
    if not isinstance(groups, int) or groups <= 1 or not isinstance(heads, int) or query.dim() < 3:
        return None
    hkv = key.shape[-3]
    if query.shape[-3] != hkv or hkv * groups != heads or query.shape[-2] != groups:
        return None
    q = query.reshape(*query.shape[:-3], heads, 1, query.shape[-1])
    mask = attn_mask  # shared by every head: (B, 1, 1, Lk), kept; per head: (B, Hkv, G, Lk) -> (B, H, 1, Lk)
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == hkv and mask.shape[-2] == groups:
        mask = mask.reshape(*mask.shape[:-3], heads, 1, mask.shape[-1])
    return q, mask


def probability_tiles(
    spec: AttentionSpec,
    *,
    heads: Tensor | None = None,
    rows: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(probs, row_index)`` tiles of the attention probabilities of ``spec``.

    The scores come from :class:`~attnkit.functional.tiles.TileSetup`, the definition every backend uses, so
    what is recorded equals ``attention(..., backend="math", return_weights=True).weights`` for every option.

    Args:
        spec: the call.
        heads: long ``(H',)`` query heads to keep, or ``None`` for all.
        rows: long ``(Lq',)`` query rows to compute, or ``None`` for all.

    Yields:
        ``probs`` ``(B, H', t, Lk)`` float32 (float64 for float64 inputs) with the batch dims flattened, and the
        long ``(t,)`` positions of its rows in the full query axis. Rows with no key to attend to are 0; with
        sinks, rows sum to ``1 - sink mass``.
    """
    setup = TileSetup(spec)
    q5, k4, _ = reshape_qkv(spec)
    B, Hkv, G, Lq, D = q5.shape
    Lk, H = spec.kv_len, spec.num_heads
    kt = setup.prepare_kv(k4).unsqueeze(2)  # (B, Hkv, 1, Lk, D)
    row_index = rows if rows is not None else torch.arange(Lq, device=q5.device)
    step = max(1, _TILE_ELEMENTS // max(1, B * H * Lk))
    for start in range(0, row_index.numel(), step):
        r = row_index[start : start + step].to(q5.device)
        t = r.numel()
        qt = q5[:, :, :, start : start + t] if rows is None else q5.index_select(3, r)
        qt = setup.prepare_query(qt).reshape(B, Hkv, 1, G * t, D)
        s = setup.logits(qt, kt, 1, t)  # (B, Hkv, 1, G, t, Lk)
        if not setup.plain:  # a plain call's scores need no mask, bias or transform
            ti = (
                TileIndex.rect((start, start + t), (0, Lk), q5.device)
                if rows is None
                else TileIndex.rows(r, Lk, q5.device)
            )
            s = setup.masked_logits(s, ti)
        p, _ = setup.tile_probs(s, lse=False)
        p = p.reshape(B, H, t, Lk)
        if heads is not None:
            p = p.index_select(1, heads.to(p.device))
        yield p, r


def select_index(sel, size: int, what: str, name: str) -> Tensor | None:
    """Long index for a heads / query_rows selection (``None`` = all); ValueError when out of range."""
    if sel is None:
        return None
    if isinstance(sel, slice):
        return torch.arange(size)[sel]
    bad = [i for i in sel if not -size <= i < size] if what == "query_rows" else [i for i in sel if i >= size]
    if bad:
        raise ValueError(f"capture: {what} {bad} out of range for {name!r}, which has {size} {what.split('_')[-1]}")
    return torch.tensor([i % size for i in sel], dtype=torch.long)


def select_weights(full: Tensor, heads: Tensor | None, rows: Tensor | None) -> Tensor:
    """The selected heads and rows of full ``(B, H, Lq, Lk)`` weights, in float32 (float64 kept)."""
    acc = torch.float64 if full.dtype == torch.float64 else torch.float32
    out = full if full.dtype == acc else full.to(acc)
    if heads is not None:
        out = out.index_select(1, heads.to(out.device))
    if rows is not None:
        out = out.index_select(2, rows.to(out.device))
    return out
