"""TileSetup: which calls are plain, and a plain tile's softmax equals the general masked softmax."""

import pytest
import torch

from attnkit.functional.spec import make_spec
from attnkit.functional.tiles import TileSetup, masked_softmax


def _qkv(dtype=torch.float64):
    return torch.randn(3, 2, 4, 7, 8, dtype=dtype).unbind(0)


@pytest.mark.parametrize(
    "terms",
    [
        {"is_causal": True},
        {"window_size": 2},
        {"attn_mask": torch.ones(7, 7, dtype=torch.bool)},
        {"attn_mask": torch.zeros(7, 7, dtype=torch.float64)},
        {"attn_bias": torch.zeros(7, 7, dtype=torch.float64)},
        {"alibi_slopes": torch.ones(4, dtype=torch.float64)},
        {"softcap": 5.0},
        {"sinks": torch.zeros(4, dtype=torch.float64)},
        {"mask_mod": lambda b, h, i, j: j <= i},
        {"score_mod": lambda s, b, h, i, j: s},
    ],
)
def test_any_term_makes_a_call_not_plain(terms):
    q, k, v = _qkv()
    assert TileSetup(make_spec(q, k, v)).plain
    assert not TileSetup(make_spec(q, k, v, **terms)).plain


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_plain_tile_probs_equal_the_masked_softmax(dtype):
    q, k, v = _qkv(dtype)
    setup = TileSetup(make_spec(q, k, v))
    s = 30 * torch.randn(2, 4, 1, 1, 7, 7, dtype=dtype)  # large logits: the max subtraction matters
    probs, lse = setup.tile_probs(s)
    want_probs, want_lse = masked_softmax(s)
    tol = {"atol": 1e-12, "rtol": 1e-12} if dtype == torch.float64 else {"atol": 1e-6, "rtol": 1e-6}
    torch.testing.assert_close(probs, want_probs, **tol)
    torch.testing.assert_close(lse, want_lse, **tol)
    torch.testing.assert_close(masked_softmax(s, finite_rows=True)[0], want_probs, **tol)
    torch.testing.assert_close(masked_softmax(s, finite_rows=True)[1], want_lse, **tol)
    assert setup.tile_probs(s, lse=False)[1] is None
    torch.testing.assert_close(setup.tile_probs(s, lse=False)[0], want_probs, **tol)


def test_mods_get_the_batch_and_head_indices():
    q, k, v = _qkv()
    seen = {}

    def score_mod(s, b, h, i, j):
        seen["b"], seen["h"] = b.flatten().tolist(), h.flatten().tolist()
        return s

    setup = TileSetup(make_spec(q, k, v, score_mod=score_mod))
    from attnkit.functional.tiles import reshape_qkv, whole

    q5, k4, _ = reshape_qkv(setup.spec)
    s = setup.logits(setup.prepare_query(q5).flatten(2, 3).unsqueeze(2), setup.prepare_kv(k4).unsqueeze(2), 1, 7)
    setup.masked_logits(s, whole(setup.spec))
    assert seen == {"b": [0, 1], "h": [0, 1, 2, 3]}
