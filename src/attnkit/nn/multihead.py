"""Multi-head attention module: self/cross attention, GQA/MQA, QK-norm, RoPE, ALiBi and a KV cache.

Vaswani et al. 2017, "Attention Is All You Need", Sec. 3.2.2 (multi-head attention); Ainslie et al. 2023,
"GQA" (grouped-query attention); Shazeer 2019 (multi-query attention); Dehghani et al. 2023, "Scaling Vision
Transformers to 22 Billion Parameters" (LayerNorm on queries and keys); Su et al. 2021 (RoPE); Press et al.
2022 (ALiBi). Every attention computation goes through :func:`attnkit.attention`, so all backends and
:func:`attnkit.explain.capture` serve it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.functional.masks import alibi_slopes, bottom_right_offset, from_key_padding_mask
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rotary import RotaryEmbedding

__all__ = ["MultiHeadAttention", "merge_masks"]


def merge_masks(attn_mask: Tensor | None, extra: Tensor | None) -> Tensor | None:
    """Combine two attnkit masks (bool True = may attend, or additive float) into one.

    Two bool masks are AND-ed; otherwise bool masks become ``0 / -inf`` floats and the masks are added.
    """
    if attn_mask is None or extra is None:
        return extra if attn_mask is None else attn_mask
    if attn_mask.dtype == torch.bool and extra.dtype == torch.bool:
        return attn_mask & extra
    dtype = attn_mask.dtype if attn_mask.dtype != torch.bool else extra.dtype

    def as_float(m: Tensor) -> Tensor:
        if m.dtype != torch.bool:
            return m.to(dtype)
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(~m, float("-inf"))

    return as_float(attn_mask) + as_float(extra)


class MultiHeadAttention(nn.Module):
    r"""Multi-head attention ``out_proj(concat_h attention(q_proj(x)_h, k_proj(y)_h, v_proj(y)_h))``.

    Shapes (``batch_first=True``): query ``(B, Lq, E)``, key ``(B, Lk, kdim)``, value ``(B, Lk, vdim)``; with
    ``batch_first=False`` the first two dims are swapped; unbatched ``(L, E)`` inputs are accepted too. Heads:
    ``H = num_heads`` query heads of ``D = E // H`` features and ``Hkv = num_kv_heads`` key/value heads
    (query head ``h`` reads key/value head ``h // (H // Hkv)``).

    Parameters (stable names): ``q_proj`` ``(E, E)``, ``k_proj`` ``(Hkv·D, kdim)``, ``v_proj``
    ``(Hkv·D, vdim)``, ``out_proj`` ``(E, E)`` (``nn.Linear``, with biases when ``bias``);
    ``q_norm``/``k_norm`` (``nn.LayerNorm(D)``) when ``qk_norm``; buffer ``alibi_slopes`` ``(H,)``
    when ``alibi``.

    Args:
        embed_dim: ``E``, input/output width of the queries; a multiple of ``num_heads``.
        num_heads: ``H``.
        num_kv_heads: ``Hkv`` (default ``H``); ``H`` must be a multiple of it. ``1`` is multi-query attention.
        kdim: key input width (default ``E``).
        vdim: value input width (default ``E``).
        bias: biases in the four projections. Default ``True``.
        dropout: attention-probability dropout, applied only in training mode.
        qk_norm: LayerNorm over ``D`` on each query and key head before the dot product (ViT-22B).
        rope: a :class:`RotaryEmbedding` of ``head_dim = D`` applied to queries and keys after ``qk_norm``;
            keys at positions ``0 .. Lk-1`` (counting cached ones), query ``i`` at ``i + Lk - Lq``.
        alibi: add ALiBi biases with :func:`attnkit.masks.alibi_slopes` ``(H)`` (Press et al. 2022).
        batch_first: inputs are ``(B, L, E)`` (default) rather than ``(L, B, E)``.
        backend: passed to :func:`attnkit.attention` (``"auto"``, ``"math"``, ``"sdpa"``, ...).
        context_parallel_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for
            all processes) over which the sequence is sharded: each rank passes its slice of the sequence and
            self-attention runs as :func:`attnkit.distributed.ring_attention` (RoPE and ALiBi use global
            positions). Default ``None``: ordinary attention.
        context_parallel_layout: how the sequence is sharded, ``"contiguous"`` or ``"zigzag"``
            (:func:`attnkit.distributed.shard`).
        device, dtype: of the parameters.

    Raises:
        ValueError: ``embed_dim`` not a multiple of ``num_heads``, ``num_heads`` not a multiple of
            ``num_kv_heads``, non-positive sizes, ``dropout`` outside ``[0, 1)``, or a ``rope`` whose
            ``head_dim`` is not ``D``.
        TypeError: ``rope`` is not a :class:`RotaryEmbedding`.

    References:
        Vaswani et al. 2017, Sec. 3.2.2; projections and masks as :class:`torch.nn.MultiheadAttention`
        (:meth:`from_torch` / :meth:`to_torch` convert exactly).

    Example:
        >>> import torch
        >>> mha = MultiHeadAttention(32, 4, num_kv_heads=2)
        >>> x = torch.randn(2, 7, 32)
        >>> out, weights = mha(x, need_weights=True)
        >>> out.shape, weights.shape
        (torch.Size([2, 7, 32]), torch.Size([2, 4, 7, 7]))
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        *,
        num_kv_heads: int | None = None,
        kdim: int | None = None,
        vdim: int | None = None,
        bias: bool = True,
        dropout: float = 0.0,
        qk_norm: bool = False,
        rope: RotaryEmbedding | None = None,
        alibi: bool = False,
        batch_first: bool = True,
        backend: str = "auto",
        context_parallel_group=None,
        context_parallel_layout: str = "contiguous",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        kdim = embed_dim if kdim is None else kdim
        vdim = embed_dim if vdim is None else vdim
        for name, val in (
            ("embed_dim", embed_dim),
            ("num_heads", num_heads),
            ("num_kv_heads", num_kv_heads),
            ("kdim", kdim),
            ("vdim", vdim),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"MultiHeadAttention: expected {name} to be a positive int, got {val!r}")
        if embed_dim % num_heads:
            valid = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0]
            raise ValueError(
                f"MultiHeadAttention: expected embed_dim (E={embed_dim}) to be a multiple of num_heads "
                f"(H={num_heads}). Valid num_heads: {', '.join(map(str, valid))}."
            )
        if num_heads % num_kv_heads:
            valid = [h for h in range(1, num_heads + 1) if num_heads % h == 0]
            raise ValueError(
                f"MultiHeadAttention: expected num_heads (H={num_heads}) to be a multiple of num_kv_heads "
                f"(Hkv={num_kv_heads}). Valid num_kv_heads: {', '.join(map(str, valid))}."
            )
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"MultiHeadAttention: expected dropout in [0, 1), got {dropout!r}")
        head_dim = embed_dim // num_heads
        if rope is not None:
            if not isinstance(rope, RotaryEmbedding):
                raise TypeError(
                    f"MultiHeadAttention: expected rope to be an attnkit.nn.RotaryEmbedding, got {type(rope).__name__}"
                )
            if rope.head_dim != head_dim:
                raise ValueError(
                    f"MultiHeadAttention: rope.head_dim={rope.head_dim} must equal head_dim = embed_dim // "
                    f"num_heads = {head_dim}"
                )
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim, self.kdim, self.vdim = head_dim, kdim, vdim
        self.dropout = float(dropout)
        self.batch_first = bool(batch_first)
        self.backend = backend
        if context_parallel_layout not in ("contiguous", "zigzag"):
            raise ValueError(
                f"MultiHeadAttention: unknown context_parallel_layout {context_parallel_layout!r}; "
                f"valid: 'contiguous', 'zigzag'"
            )
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = context_parallel_layout
        factory = {"device": device, "dtype": dtype}
        kv_width = num_kv_heads * head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(kdim, kv_width, bias=bias, **factory)
        self.v_proj = nn.Linear(vdim, kv_width, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.q_norm = nn.LayerNorm(head_dim, **factory) if qk_norm else None
        self.k_norm = nn.LayerNorm(head_dim, **factory) if qk_norm else None
        self.rope = rope
        if alibi:
            self.register_buffer("alibi_slopes", alibi_slopes(num_heads, device=device), persistent=False)
        else:
            self.alibi_slopes = None

    def extra_repr(self) -> str:
        return (
            f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"dropout={self.dropout}, batch_first={self.batch_first}, backend={self.backend!r}"
        )

    def _batched(self, name: str, x: Tensor, width: int, unbatched: bool) -> Tensor:
        """Check ``x`` and return it as ``(B, L, width)``."""
        if not isinstance(x, Tensor):
            raise TypeError(f"MultiHeadAttention: expected {name} to be a tensor, got {type(x).__name__}")
        expected_ndim = 2 if unbatched else 3
        layout = "(L, width)" if unbatched else ("(B, L, width)" if self.batch_first else "(L, B, width)")
        if x.ndim != expected_ndim or x.shape[-1] != width:
            raise ValueError(
                f"MultiHeadAttention: expected {name} of shape {layout} with width={width}, got {tuple(x.shape)}"
            )
        if unbatched:
            return x.unsqueeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def forward(
        self,
        query: Tensor,
        key: Tensor | None = None,
        value: Tensor | None = None,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        is_causal: bool = False,
        kv_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """Attend from ``query`` to ``key``/``value`` (self-attention when they are omitted).

        Args:
            query: ``(B, Lq, E)`` (``(Lq, B, E)`` if not ``batch_first``; ``(Lq, E)`` unbatched).
            key: ``(B, Lk, kdim)``; default ``query``.
            value: ``(B, Lk, vdim)``; default ``key``.
            attn_mask: attnkit convention (**bool True = may attend**, or a float added to the scores; the
                *opposite* of nn.MultiheadAttention's bool convention), broadcastable to ``(B, H, Lq, Lk)``,
                e.g. ``(Lq, Lk)``; a 3-D ``(B·H, Lq, Lk)`` mask as nn.MultiheadAttention takes is reshaped.
                ``Lk`` counts cached keys.
            key_padding_mask: ``(B, Lk)`` (``(Lk,)`` unbatched); **True = padding, ignored** (the meaning of
                nn.MultiheadAttention's argument of the same name), or a float added to the scores.
            is_causal: apply a causal mask, bottom-right aligned (query ``i`` sees keys ``j <= i + Lk - Lq``),
                which is what decoding with ``kv_cache`` needs. Unlike nn.MultiheadAttention it is not a hint:
                the mask is applied.
            kv_cache: a :class:`KVCache`; the new keys/values are appended to it and the queries attend to the
                whole cache.
            need_weights: also return the per-head attention probabilities (computed on a backend that
                returns them; nn.MultiheadAttention's default output is their mean over heads,
                ``weights.mean(1)``).

        Returns:
            ``(output, weights)``: ``output`` shaped like ``query`` with width ``E``; ``weights``
            ``(B, H, Lq, Lk)`` (``(H, Lq, Lk)`` unbatched) before dropout, or ``None``. Query rows with no key
            left to attend to give zeros.

        Raises:
            TypeError: a non-tensor input.
            ValueError: inputs of the wrong rank or width, batch or length mismatch between key and value, a
                mask that does not broadcast (from :func:`attnkit.attention`).
        """
        unbatched = isinstance(query, Tensor) and query.ndim == 2
        key = query if key is None else key
        value = key if value is None else value
        q_in = self._batched("query", query, self.embed_dim, unbatched)
        k_in = self._batched("key", key, self.kdim, unbatched)
        v_in = self._batched("value", value, self.vdim, unbatched)
        if k_in.shape[:2] != v_in.shape[:2] or k_in.shape[0] != q_in.shape[0]:
            raise ValueError(
                f"MultiHeadAttention: query {tuple(query.shape)}, key {tuple(key.shape)} and value "
                f"{tuple(value.shape)} must share the batch size, and key and value the length"
            )
        batch, q_len = q_in.shape[:2]
        cp = self.context_parallel_group is not None
        if cp:
            self._check_context_parallel(query, key, value, attn_mask, key_padding_mask, kv_cache, need_weights)
        q = self.q_proj(q_in).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)  # (B, H, Lq, D)
        k = self.k_proj(k_in).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, Lk, D)
        v = self.v_proj(v_in).unflatten(-1, (self.num_kv_heads, self.head_dim)).transpose(1, 2)  # (B, Hkv, Lk, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        past = len(kv_cache) if kv_cache is not None else 0
        if self.rope is not None and cp:
            pos = self._global_positions(q_len, q.device)
            q, k = self.rope(q, pos), self.rope(k, pos)
        elif self.rope is not None:
            kv_len = past + k.shape[-2]
            k = self.rope(k, torch.arange(past, kv_len, device=k.device))
            q = self.rope(q, torch.arange(bottom_right_offset(q_len, kv_len), kv_len, device=q.device))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        if cp:
            from attnkit.distributed import ring_attention

            out = ring_attention(
                q,
                k,
                v,
                group=self.context_parallel_group,
                layout=self.context_parallel_layout,
                is_causal=is_causal,
                alibi_slopes=self.alibi_slopes,
                backend=self.backend,
            )
            out = self.out_proj(out.transpose(1, 2).flatten(-2))  # (B, Lq, H·D) -> (B, Lq, E)
            if unbatched:
                return out.squeeze(0), None
            return (out if self.batch_first else out.transpose(0, 1)), None

        mask = attn_mask
        if mask is not None and mask.ndim == 3 and not unbatched and mask.shape[0] == batch * self.num_heads:
            mask = mask.unflatten(0, (batch, self.num_heads))  # (B·H, Lq, Lk) -> (B, H, Lq, Lk)
        if key_padding_mask is not None:
            kpm = key_padding_mask.unsqueeze(0) if unbatched and key_padding_mask.ndim == 1 else key_padding_mask
            mask = merge_masks(mask, from_key_padding_mask(kpm))
        result = attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=is_causal,
            alibi_slopes=self.alibi_slopes,
            dropout_p=self.dropout if self.training else 0.0,
            return_weights=need_weights,
            backend=self.backend,
        )
        out, weights = (result.output, result.weights) if need_weights else (result, None)
        out = self.out_proj(out.transpose(1, 2).flatten(-2))  # (B, Lq, H·D) -> (B, Lq, E)
        if unbatched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _check_context_parallel(self, query, key, value, attn_mask, key_padding_mask, kv_cache, need_weights):
        unsupported = {
            "cross-attention (key/value other than query)": not (key is query and value is query),
            "attn_mask (pass masks to attnkit.distributed.ring_attention as mask_mod/block_mask)": attn_mask
            is not None,
            "key_padding_mask": key_padding_mask is not None,
            "kv_cache": kv_cache is not None,
            "need_weights": need_weights,
            "attention dropout in training mode": self.training and self.dropout > 0,
        }
        used = [name for name, on in unsupported.items() if on]
        if used:
            raise ValueError(
                f"MultiHeadAttention: context_parallel_group is set, and context-parallel self-attention does not "
                f"support {', '.join(used)}"
            )

    def _global_positions(self, local_len: int, device) -> Tensor:
        """Global position of each local row of the sharded sequence (for RoPE)."""
        import torch.distributed as dist

        from attnkit.distributed import global_positions

        group = self.context_parallel_group
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        return global_positions(self.context_parallel_layout, rank, size, local_len, device=device)

    @classmethod
    def from_torch(cls, module: nn.MultiheadAttention, *, backend: str = "auto") -> MultiHeadAttention:
        """A :class:`MultiHeadAttention` with the weights, sizes, dropout and layout of ``module``.

        Args:
            module: a :class:`torch.nn.MultiheadAttention` without ``add_bias_kv`` / ``add_zero_attn``.
            backend: passed to :func:`attnkit.attention`.

        Returns:
            a module whose outputs equal ``module``'s on the same inputs (masks translated: a bool
            ``attn_mask`` must be inverted, ``key_padding_mask`` is the same).

        Raises:
            TypeError: ``module`` is not an nn.MultiheadAttention.
            ValueError: ``module`` uses ``add_bias_kv`` or ``add_zero_attn``, which have no equivalent here.
        """
        if not isinstance(module, nn.MultiheadAttention):
            raise TypeError(f"from_torch: expected an nn.MultiheadAttention, got {type(module).__name__}")
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError("from_torch: add_bias_kv and add_zero_attn are not supported; expected them False")
        ref = module.out_proj.weight
        new = cls(
            module.embed_dim,
            module.num_heads,
            kdim=module.kdim,
            vdim=module.vdim,
            bias=module.in_proj_bias is not None,
            dropout=module.dropout,
            batch_first=module.batch_first,
            backend=backend,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            if module._qkv_same_embed_dim:
                wq, wk, wv = module.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
            for proj, w in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                proj.weight.copy_(w)
            if module.in_proj_bias is not None:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj), module.in_proj_bias.chunk(3)):
                    proj.bias.copy_(b)
                new.out_proj.bias.copy_(module.out_proj.bias)
            new.out_proj.weight.copy_(module.out_proj.weight)
        return new.train(module.training)

    def to_torch(self) -> nn.MultiheadAttention:
        """An equivalent :class:`torch.nn.MultiheadAttention` (weights copied).

        Raises:
            ValueError: this module uses a feature nn.MultiheadAttention lacks (``num_kv_heads != num_heads``,
                ``qk_norm``, ``rope``, ``alibi``).
        """
        extras = {
            "num_kv_heads != num_heads": self.num_kv_heads != self.num_heads,
            "qk_norm": self.q_norm is not None,
            "rope": self.rope is not None,
            "alibi": self.alibi_slopes is not None,
        }
        used = [name for name, on in extras.items() if on]
        if used:
            raise ValueError(f"to_torch: nn.MultiheadAttention has no equivalent of {', '.join(used)}")
        ref = self.out_proj.weight
        bias = self.out_proj.bias is not None
        module = nn.MultiheadAttention(
            self.embed_dim,
            self.num_heads,
            dropout=self.dropout,
            bias=bias,
            kdim=self.kdim,
            vdim=self.vdim,
            batch_first=self.batch_first,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            if module._qkv_same_embed_dim:
                module.in_proj_weight.copy_(torch.cat(weights))
            else:
                for dst, w in zip((module.q_proj_weight, module.k_proj_weight, module.v_proj_weight), weights):
                    dst.copy_(w)
            if bias:
                module.in_proj_bias.copy_(torch.cat((self.q_proj.bias, self.k_proj.bias, self.v_proj.bias)))
                module.out_proj.bias.copy_(self.out_proj.bias)
            module.out_proj.weight.copy_(self.out_proj.weight)
        return module.train(self.training)
