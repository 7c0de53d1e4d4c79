"""LocalAttention / LongformerAttention against the same projections run through dense float64 attention."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.nn.local_attention import LocalAttention, LongformerAttention


def _dense_reference(layer, x, mask):
    B, L, E = x.shape
    H, Hkv, D = layer.num_heads, layer.num_kv_heads, layer.head_dim
    q = layer.q_proj(x).view(B, L, H, D).transpose(1, 2)
    k, v = layer.kv_proj(x).view(B, L, 2, Hkv, D).unbind(2)
    out = attnkit.attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, backend="math")
    return layer.out_proj(out.transpose(1, 2).reshape(B, L, E))


@pytest.mark.parametrize("causal", [False, True])
def test_local_attention_is_windowed_attention(causal):
    torch.manual_seed(0)
    layer = LocalAttention(24, 4, window_size=(5, 3), is_causal=causal, num_kv_heads=2, dtype=torch.float64)
    x = torch.randn(2, 37, 24, dtype=torch.float64)
    mask = attnkit.masks.sliding_window(37, 37, (5, 3))
    if causal:
        mask = mask & attnkit.masks.causal(37)
    torch.testing.assert_close(layer(x), _dense_reference(layer, x, mask), atol=1e-10, rtol=1e-9)
    layer.backend = "blocksparse"  # the layer's sparse path gives the same answer
    torch.testing.assert_close(layer(x), _dense_reference(layer, x, mask), atol=1e-10, rtol=1e-9)


def test_longformer_window_global_and_padding_with_gradients():
    torch.manual_seed(1)
    layer = LongformerAttention(16, 2, window_size=4, global_tokens=[0, 20], block_size=8, dtype=torch.float64)
    x = torch.randn(2, 45, 16, dtype=torch.float64, requires_grad=True)
    pad = torch.zeros(2, 45, dtype=torch.bool)
    pad[1, 40:] = True  # True = padding, as in nn.MultiheadAttention
    i, j = torch.arange(45).view(-1, 1), torch.arange(45).view(1, -1)
    glob = torch.zeros(45, dtype=torch.bool)
    glob[[0, 20]] = True
    mask = (((i - j).abs() <= 4) | glob[i] | glob[j]) & ~pad[:, None, None, :]
    got = layer(x, key_padding_mask=pad)
    ref = _dense_reference(layer, x, mask)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=1e-9)
    g1 = torch.autograd.grad(got.sum(), [x, *layer.parameters()])
    g2 = torch.autograd.grad(ref.sum(), [x, *layer.parameters()])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="embed_dim=10 is not a multiple of num_heads=4"):
        LocalAttention(10, 4)
    with pytest.raises(ValueError, match="use LocalAttention for causal"):
        LongformerAttention(8, 2, is_causal=True)
    with pytest.raises(ValueError, match=r"expected x of shape \(B, L, E=8\)"):
        LocalAttention(8, 2)(torch.randn(3, 8))
