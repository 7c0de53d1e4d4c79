"""Per-head probabilities of ``nn.MultiheadAttention`` and of ``nn.TransformerEncoderLayer``'s fast path.

``nn.MultiheadAttention`` returns head-averaged weights by default and none with ``need_weights=False``, and
``nn.TransformerEncoderLayer`` in eval mode without grad runs a native kernel that never calls the attention
module. Both are recomputed here from the module's own projections, with ``dropout_p = 0`` (weights before
dropout), without touching the model's outputs.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ModuleHooks", "encoder_layer_weights", "mha_weights"]

_MHA_SIG = inspect.signature(nn.MultiheadAttention.forward)
_ENC_SIG = inspect.signature(nn.TransformerEncoderLayer.forward)


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


def _bind(sig: inspect.Signature, module: nn.Module, args: tuple, kwargs: dict) -> dict:
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def _same(a: Tensor, b: Tensor) -> bool:
    """The same tokens (self-attention): one tensor, or views of the same memory."""
    if a is b:
        return True
    if a.is_nested or b.is_nested:
        return False
    return a.shape == b.shape and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()


class ModuleHooks:
    """Forward hooks of :class:`attnkit.explain._intercept.Interceptor` for the two torch modules above."""

    # nn.MultiheadAttention: per-head weights unless an intercepted SDPA call inside it produced them.
    def _mha_pre(self, module, args, kwargs):
        self.mha_entries[id(module)] = self.mha_entries.get(id(module), 0) + 1
        self.mha_start[id(module)] = self.rec.num_calls
        if self.differentiable and not self.suspended and self.stack:
            a = _bind(_MHA_SIG, module, args, kwargs)
            if a["need_weights"]:
                # Run the SDPA path (intercepted, differentiable) and hand the weights back in _mha_post.
                self.mha_wants[id(module)] = (a["average_attn_weights"], a["query"].dim() == 2)
                kwargs = {**kwargs, "need_weights": False}
                if len(args) > 4:
                    args = (*args[:4], False, *args[5:])
                    kwargs.pop("need_weights")
                result = (args, kwargs)
            else:
                result = None
        else:
            result = None
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        if self.stack and isinstance(q, Tensor) and isinstance(k, Tensor):
            self.stack[-1] = (self.stack[-1][0], not _same(q, k), module)
        return result

    def _mha_post(self, module, args, kwargs, output):
        start = self.mha_start.pop(id(module), None)
        wants = self.mha_wants.pop(id(module), None)
        if wants is not None and start is not None:
            made = [m for m in self.rec.maps if m.call >= start and m.weights is not None]
            if made and isinstance(output, tuple):
                w = made[-1].weights
                w = w.mean(1) if wants[0] else w
                return (output[0], w.squeeze(0) if wants[1] else w)
        if self.suspended or start is None or self.rec.num_calls > start or not self.stack:
            return None
        a = _bind(_MHA_SIG, module, args, kwargs)
        name, _ = self._where()
        layer = self._layer(name)
        cross = not _same(a["query"], a["key"])
        if self.layers is not None and layer not in self.layers:
            self._count()
            return None
        w = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        dropping = module.training and module.dropout > 0
        if w is None or a["average_attn_weights"] or dropping or w.dim() not in (3, 4):
            w = mha_weights(
                module,
                a["query"],
                a["key"],
                a["value"],
                key_padding_mask=a["key_padding_mask"],
                attn_mask=a["attn_mask"],
                is_causal=a["is_causal"],
            )
        elif w.dim() == 3:
            w = w.unsqueeze(0)
        self._record(name, layer, cross, "nn.MultiheadAttention", weights=w.detach())
        return None

    def _enc_pre(self, module, args, kwargs):
        self.enc_start[id(module)] = self.mha_entries.get(id(module.self_attn), 0)

    def _enc_post(self, module, args, kwargs, output):
        before = self.enc_start.pop(id(module), None)
        if self.suspended or before is None or self.mha_entries.get(id(module.self_attn), 0) > before:
            return None
        # The native fast path ran: the attention module was never called. Recompute from the layer input.
        a = _bind(_ENC_SIG, module, args, kwargs)
        name = self.names[module.self_attn]
        layer = self._layer(name)
        if self.layers is not None and layer not in self.layers:
            self._count()
            return None
        w = encoder_layer_weights(module, a["src"], a["src_mask"], a["src_key_padding_mask"], a["is_causal"])
        self._record(name, layer, False, "nn.MultiheadAttention", weights=w)
        return None
