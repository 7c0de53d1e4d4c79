"""Per-head probabilities of ``nn.MultiheadAttention`` and of ``nn.TransformerEncoderLayer``'s fast path.

``nn.MultiheadAttention`` returns head-averaged weights by default and none with ``need_weights=False``, and
``nn.TransformerEncoderLayer`` in eval mode without grad runs a native kernel that never calls the attention
module. Both are recomputed here from the module's own projections, with ``dropout_p = 0`` (weights before
dropout), without touching the model's outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["encoder_layer_weights", "mha_weights"]


def _padded(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """A nested ``(B, *L, E)`` tensor as padded ``(B, Lmax, E)`` and its key padding mask (True = padding)."""
    if not x.is_nested:
        return x, None
    lengths = torch.tensor([t.shape[0] for t in x.unbind()], device=x.device)
    dense = x.to_padded_tensor(0.0)
    pad = torch.arange(dense.shape[1], device=x.device)[None, :] >= lengths[:, None]
    return dense, pad


@torch.no_grad()
def mha_weights(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    key_padding_mask: Tensor | None = None,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """``(B, H, L, S)`` probabilities ``mha(query, key, value, ...)`` uses, before dropout.

    Nested inputs (from ``nn.TransformerEncoder``'s fast path) are padded; rows of padded queries are 0.
    """
    query, qpad = _padded(query)
    key, kpad = _padded(key)
    value, _ = _padded(value)
    if kpad is not None:
        key_padding_mask = kpad if key_padding_mask is None else key_padding_mask
    batched = query.dim() == 3
    if not batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif mha.batch_first:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    separate = not mha._qkv_same_embed_dim
    _, weights = F.multi_head_attention_forward(
        query,
        key,
        value,
        mha.embed_dim,
        mha.num_heads,
        mha.in_proj_weight,
        mha.in_proj_bias,
        mha.bias_k,
        mha.bias_v,
        mha.add_zero_attn,
        0.0,
        mha.out_proj.weight,
        mha.out_proj.bias,
        training=False,
        key_padding_mask=key_padding_mask,
        need_weights=True,
        attn_mask=attn_mask,
        use_separate_proj_weight=separate,
        q_proj_weight=mha.q_proj_weight if separate else None,
        k_proj_weight=mha.k_proj_weight if separate else None,
        v_proj_weight=mha.v_proj_weight if separate else None,
        average_attn_weights=False,
        is_causal=is_causal and attn_mask is not None,
    )
    if weights.dim() == 3:  # unbatched (H, L, S)
        weights = weights.unsqueeze(0)
    if qpad is not None:
        weights = weights.masked_fill(qpad[:, None, :, None], 0.0)
    return weights


@torch.no_grad()
def encoder_layer_weights(
    layer: nn.TransformerEncoderLayer,
    src: Tensor,
    src_mask: Tensor | None = None,
    src_key_padding_mask: Tensor | None = None,
    is_causal: bool = False,
) -> Tensor:
    """``(B, H, L, L)`` self-attention probabilities of ``layer`` for input ``src`` (what its fast path used)."""
    x, pad = _padded(src)
    if pad is not None and src_key_padding_mask is None:
        src_key_padding_mask = pad
    if layer.norm_first:
        x = layer.norm1(x)
    if pad is not None:
        # mha_weights pads nested inputs itself; re-nest so padded query rows are zeroed there.
        x = torch.nested.nested_tensor([x[i, : int((~pad[i]).sum())] for i in range(x.shape[0])])
    return mha_weights(
        layer.self_attn,
        x,
        x,
        x,
        key_padding_mask=src_key_padding_mask,
        attn_mask=src_mask,
        is_causal=is_causal,
    )
