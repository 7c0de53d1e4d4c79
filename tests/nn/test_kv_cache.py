"""KVCache: decoding one token at a time equals one causal run over the whole sequence."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.nn import KVCache, MultiHeadAttention, RotaryEmbedding, TransformerEncoderLayer

BACKENDS = list(attnkit.backends.available())
TOL = {"atol": 1e-6, "rtol": 1e-5}  # float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("features", ["plain", "gqa+rope", "mqa+alibi+qk_norm"])
def test_incremental_decoding_equals_full_causal_run(backend, features):
    torch.manual_seed(0)
    options = {
        "plain": {},
        "gqa+rope": {"num_kv_heads": 2, "rope": RotaryEmbedding(8)},
        "mqa+alibi+qk_norm": {"num_kv_heads": 1, "alibi": True, "qk_norm": True},
    }[features]
    m = MultiHeadAttention(32, 4, backend=backend, **options).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        full, _ = m(x, is_causal=True)
        cache = KVCache()
        prefill, _ = m(x[:, :4], is_causal=True, kv_cache=cache)  # a prompt, then single tokens
        steps = [prefill] + [m(x[:, t : t + 1], is_causal=True, kv_cache=cache)[0] for t in range(4, 9)]
    assert len(cache) == 9 and cache.key.shape == (2, m.num_kv_heads, 9, 8)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_incremental_decoding_with_padding_mask():
    """A left-padded batch: key_padding_mask covers cached plus new keys."""
    torch.manual_seed(0)
    m = MultiHeadAttention(16, 2, rope=RotaryEmbedding(8)).eval()
    x = torch.randn(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, :2] = True
    with torch.no_grad():
        full, _ = m(x, is_causal=True, key_padding_mask=kpm)
        cache = KVCache()
        steps = [
            m(x[:, t : t + 1], is_causal=True, kv_cache=cache, key_padding_mask=kpm[:, : t + 1])[0] for t in range(6)
        ]
    torch.testing.assert_close(torch.cat(steps, dim=1)[1, 2:], full[1, 2:], **TOL)
    torch.testing.assert_close(torch.cat(steps, dim=1)[0], full[0], **TOL)


def test_encoder_layer_with_cache_is_a_causal_decoder_block():
    torch.manual_seed(0)
    layer = TransformerEncoderLayer(16, 4, norm_first=True, rope=RotaryEmbedding(4)).eval()
    x = torch.randn(1, 5, 16)
    with torch.no_grad():
        full = layer(x, is_causal=True)
        cache = KVCache()
        steps = [layer(x[:, t : t + 1], is_causal=True, kv_cache=cache) for t in range(5)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_cache_update_reset_and_errors():
    cache = KVCache()
    assert len(cache) == 0
    k, v = cache.update(torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, 5))
    assert k.shape == (1, 2, 3, 4) and v.shape == (1, 2, 3, 5)
    k, v = cache.update(torch.ones(1, 2, 2, 4), torch.zeros(1, 2, 2, 5))
    assert k[..., 3:, :].eq(1).all() and k[..., :3, :].eq(0).all() and len(cache) == 5
    with pytest.raises(ValueError, match=r"new key of shape \(1, 3, 1, 4\) does not continue the cached"):
        cache.update(torch.zeros(1, 3, 1, 4), torch.zeros(1, 3, 1, 5))
    with pytest.raises(ValueError, match="expected key"):
        cache.update(torch.zeros(2, 1, 4), torch.zeros(2, 1, 5))
    cache.reset()
    assert len(cache) == 0 and cache.key is None
