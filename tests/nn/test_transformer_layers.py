"""Transformer encoder/decoder layers against torch.nn.TransformerEncoderLayer/DecoderLayer and transformers'
ViTLayer, with copied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.nn import KVCache, MultiHeadAttention, TransformerDecoderLayer, TransformerEncoderLayer

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32, several sublayers deep


def randomize(module: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.2 + (1.0 if param.ndim == 1 else 0.0) * 0.1)


def copy_from_torch(ours: nn.Module, ref: nn.Module, attn_names: dict[str, str]) -> None:
    """Load ``ref``'s weights into ``ours``: attention modules through from_torch, the rest by name."""
    state = {}
    for ref_name, our_name in attn_names.items():
        converted = MultiHeadAttention.from_torch(getattr(ref, ref_name)).state_dict()
        state.update({f"{our_name}.{k}": v for k, v in converted.items()})
    for name, tensor in ref.state_dict().items():
        if name.split(".")[0] not in attn_names:
            state[name] = tensor
    ours.load_state_dict(state)


def masks(b: int, length: int):
    kpm = torch.zeros(b, length, dtype=torch.bool)
    kpm[0, length - 2 :] = True
    kpm[1, 0] = True
    return kpm


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("mask", ["none", "kpm", "causal", "bool"])
def test_encoder_layer_matches_torch(norm_first, activation, mask):
    b, length, e, h = 3, 6, 16, 4
    ref = nn.TransformerEncoderLayer(
        e, h, dim_feedforward=40, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
    ).eval()
    randomize(ref)
    ours = TransformerEncoderLayer(e, h, ffn_dim=40, activation=activation, norm_first=norm_first).eval()
    copy_from_torch(ours, ref, {"self_attn": "self_attn"})
    x = torch.randn(b, length, e)
    torch_kwargs, our_kwargs = {}, {}
    if mask == "kpm":
        torch_kwargs["src_key_padding_mask"] = our_kwargs["key_padding_mask"] = masks(b, length)
    if mask == "causal":
        torch_kwargs = {"src_mask": nn.Transformer.generate_square_subsequent_mask(length), "is_causal": True}
        our_kwargs["is_causal"] = True
    if mask == "bool":
        disallow = torch.rand(length, length) < 0.3
        disallow.fill_diagonal_(False)
        torch_kwargs["src_mask"], our_kwargs["attn_mask"] = disallow, ~disallow
    expected = ref(x, **torch_kwargs)  # with autograd on: torch's reference path, not the native fast path
    torch.testing.assert_close(ours(x, **our_kwargs), expected, **TOL)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    b, length, src, e, h = 2, 5, 7, 16, 4
    ref = nn.TransformerDecoderLayer(
        e, h, dim_feedforward=24, dropout=0.0, activation="gelu", batch_first=True, norm_first=norm_first
    ).eval()
    randomize(ref, 1)
    ours = TransformerDecoderLayer(e, h, ffn_dim=24, norm_first=norm_first).eval()
    copy_from_torch(ours, ref, {"self_attn": "self_attn", "multihead_attn": "cross_attn"})
    x, memory = torch.randn(b, length, e), torch.randn(b, src, e)
    memory_kpm = masks(b, src)
    expected = ref(
        x,
        memory,
        tgt_mask=nn.Transformer.generate_square_subsequent_mask(length),
        tgt_is_causal=True,
        memory_key_padding_mask=memory_kpm,
    )
    got = ours(x, memory, is_causal=True, memory_key_padding_mask=memory_kpm)
    torch.testing.assert_close(got, expected, **TOL)


def test_decoder_layer_kv_cache_matches_full_run():
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(16, 4, num_kv_heads=2, norm_first=True).eval()
    x, memory = torch.randn(2, 6, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        full = layer(x, memory, is_causal=True)
        cache = KVCache()
        steps = [layer(x[:, :2], memory, is_causal=True, kv_cache=cache)]
        steps += [layer(x[:, t : t + 1], memory, is_causal=True, kv_cache=cache) for t in range(2, 6)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_encoder_layer_batch_first_false_matches():
    torch.manual_seed(0)
    a = TransformerEncoderLayer(16, 2, norm_first=True).eval()
    b = TransformerEncoderLayer(16, 2, norm_first=True, batch_first=False).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(b(x.transpose(0, 1)).transpose(0, 1), a(x), atol=1e-6, rtol=1e-6)


def test_encoder_layer_matches_transformers_vit_layer():
    """A ViT layer is pre-norm, exact GELU, LayerNorm eps 1e-12 (transformers' ViTLayer)."""
    vit = pytest.importorskip("transformers.models.vit.modeling_vit")
    from transformers import ViTConfig

    config = ViTConfig(hidden_size=32, num_attention_heads=4, intermediate_size=48, layer_norm_eps=1e-12)
    ref = vit.ViTLayer(config).eval()
    randomize(ref, 2)
    ours = TransformerEncoderLayer(32, 4, ffn_dim=48, norm_first=True, layer_norm_eps=1e-12).eval()
    s = ref.state_dict()
    mapping = {  # transformers 5 names of ViTLayer's submodules
        "self_attn.q_proj": "attention.q_proj",
        "self_attn.k_proj": "attention.k_proj",
        "self_attn.v_proj": "attention.v_proj",
        "self_attn.out_proj": "attention.o_proj",
        "linear1": "mlp.fc1",
        "linear2": "mlp.fc2",
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
    }
    ours.load_state_dict({f"{o}.{p}": s[f"{r}.{p}"] for o, r in mapping.items() for p in ("weight", "bias")})
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        out = ref(x)
        expected = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(ours(x), expected, **TOL)


def test_layer_errors():
    with pytest.raises(ValueError, match="unknown name 'tanh'; valid: 'relu', 'gelu'"):
        TransformerEncoderLayer(16, 2, activation="tanh")
    with pytest.raises(ValueError, match="ffn_dim to be a positive int, got 0"):
        TransformerDecoderLayer(16, 2, ffn_dim=0)
    with pytest.raises(ValueError, match="dropout in"):
        TransformerEncoderLayer(16, 2, dropout=-0.1)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        TransformerEncoderLayer(16, 3)
