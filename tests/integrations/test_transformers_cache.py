"""attn_implementation="attnkit" with KV caches: DynamicCache chunks, StaticCache prefill, generate() vs eager."""

import pytest
import torch
from transformers import DynamicCache, StaticCache

from attnkit.integrations.transformers import register
from hf_tiny import DECODERS, _ids, causal_lm, eager_softmax_in_float64

TOL64 = 1e-9


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


@pytest.fixture
def float64_softmax(monkeypatch):
    eager_softmax_in_float64(monkeypatch)


def _batch(n=13):
    """Two sequences of ``n`` tokens, the first left-padded by 3 (how generate() pads a batch)."""
    return _ids(n=n, left=3, right=0)


@torch.no_grad()
def _chunked_logits(model, impl, batch, chunks, cache_factory):
    """Logits of the real positions when the sequence is fed in ``chunks`` through one cache."""
    model.set_attn_implementation(impl)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    cache, start, logits = cache_factory(model), 0, []
    for size in chunks:
        stop = start + size
        out = model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop], cache=cache, use_cache=True)
        logits.append(out.logits)
        start = stop
    assert start == ids.shape[1]
    return torch.cat(logits, 1)


def _dynamic(model):
    return DynamicCache(config=model.config)


def _static(model):
    return StaticCache(config=model.config, max_cache_len=24)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize(
    "cache_factory, chunks",
    [(_dynamic, (8, 4, 1)), (_static, (8, 4, 1)), (_static, (13,))],
    ids=["dynamic-8-4-1", "static-8-4-1", "static-prefill"],
)
def test_cached_chunks_match_eager(name, cache_factory, chunks, float64_softmax):
    """Prefill then chunks of 4 and 1 tokens (windows of 4 are crossed, so sliding caches drop keys), float64."""
    model = causal_lm(name).double()
    batch = _batch()
    real = batch["attention_mask"].bool()
    ref = _chunked_logits(model, "eager", batch, chunks, cache_factory)
    out = _chunked_logits(model, "attnkit", batch, chunks, cache_factory)
    torch.testing.assert_close(out[real], ref[real], atol=TOL64, rtol=0.0)
    # and the same logits as one uncached pass
    full = _chunked_logits(model, "attnkit", batch, (batch["input_ids"].shape[1],), lambda m: None)
    torch.testing.assert_close(out[real], full[real], atol=TOL64, rtol=0.0)


@pytest.mark.parametrize("name", list(DECODERS))
@pytest.mark.parametrize("cache_implementation", [None, "static"])
def test_generate_greedy_tokens_equal_eager(name, cache_implementation):
    model = causal_lm(name)
    batch = _batch(9)
    tokens = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        tokens[impl] = model.generate(
            **batch,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            cache_implementation=cache_implementation,
        )
    assert tokens["attnkit"].shape == (2, 15)
    assert torch.equal(tokens["attnkit"], tokens["eager"])
