"""What capture records equals the math backend's weights, for every option on every backend (issue: one
definition of attention), and the kind/shape of records for cached decoding of Hugging Face decoders."""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from torch import nn

import attnkit
from attn_strategies import attention_case
from attnkit.backends import available
from attnkit.explain import capture

BACKENDS = ["math", "sdpa", "tiled", "blocksparse", "auto"]


class _Call(nn.Module):
    def __init__(self, kwargs, backend):
        super().__init__()
        self.kwargs, self.backend = kwargs, backend

    def forward(self, q, k, v):
        return attnkit.attention(q, k, v, backend=self.backend, **self.kwargs)


def _options(backend):
    return None if backend == "auto" else set(available()[backend].options) | {"sinks"}


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=attention_case(extras=True, max_len=13), return_lse=...)
def test_capture_equals_math_weights(backend, data, return_lse: bool):
    q, k, v, kwargs = data.tensors(torch.float32)
    if backend == "sdpa" and q.shape[-1] != v.shape[-1]:  # its lse (return_lse, sinks) needs the CPU flash kernel
        return_lse = False
        kwargs.pop("sinks", None)
    opts = _options(backend)
    if opts is not None and not set(kwargs).issubset(opts | {"scale", "attn_mask", "is_causal", "window_size"}):
        kwargs = {n: val for n, val in kwargs.items() if n in opts or n in ("scale", "attn_mask")}
    want = attnkit.attention(q, k, v, backend="math", return_weights=True, **kwargs).weights
    model = _Call({**kwargs, "return_lse": return_lse}, backend)
    with torch.no_grad(), capture(model) as rec:
        model(q, k, v)
    (m,) = rec.maps
    assert m.kind == "self" and m.shape == (want[..., 0, 0, 0].numel(), *want.shape[-3:])
    torch.testing.assert_close(m.weights, want.reshape(m.shape).float(), atol=1e-6, rtol=0)


def test_longformer_and_local_maps_stay_inside_the_layout():
    torch.manual_seed(0)
    x = torch.randn(2, 40, 32)
    for module in (
        attnkit.nn.LongformerAttention(32, 2, window_size=4, global_tokens=1, block_size=8),
        attnkit.nn.LocalAttention(32, 2, window_size=3),
    ):
        module.eval()
        with torch.no_grad(), capture(module) as rec:
            module(x)
        (m,) = rec.maps
        w = m.weights
        rows = w.sum(-1)
        assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
        i, j = torch.arange(40).view(-1, 1), torch.arange(40).view(1, -1)
        if isinstance(module, attnkit.nn.LongformerAttention):
            allowed = ((i - j).abs() <= 4) | (i == 0) | (j == 0)
        else:
            allowed = (i - j).abs() <= 3
        assert w.masked_select(~allowed.expand_as(w)).abs().max() == 0


def _decoder(arch):
    """A tiny random-config decoder from tests/hf_tiny.py on SDPA, and a copy of it on eager attention."""
    hf_tiny = pytest.importorskip("hf_tiny")
    sdpa = getattr(hf_tiny, arch)()().double()
    sdpa.set_attn_implementation("sdpa")
    eager = copy.deepcopy(sdpa)
    eager.set_attn_implementation("eager")
    return sdpa, eager, hf_tiny.VOCAB


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # Mistral: a sliding window of 4, shorter than the text
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decoding_records_self_attention_like_eager(arch, padded):
    from transformers import DynamicCache

    sdpa, eager, vocab = _decoder(arch)
    ids = torch.randint(3, vocab, (2, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 13, dtype=torch.long)
    if padded:
        mask[1, :3] = 0  # left padding: HF passes a mask, and the one-token GQA step packs the heads
    cache_s, cache_e = DynamicCache(config=sdpa.config), DynamicCache(config=eager.config)
    start = 0
    for step in (4, 4, 1, 1, 3):
        stop = start + step
        kw = {"attention_mask": mask[:, :stop], "use_cache": True}
        with torch.no_grad(), capture(sdpa) as rec:
            sdpa(ids[:, start:stop], cache=cache_s, **kw)
        with torch.no_grad():
            ref = eager(ids[:, start:stop], cache=cache_e, output_attentions=True, **kw).attentions
        assert len(rec.maps) == len(ref) == 2
        for m, r in zip(rec.maps, ref):
            assert m.kind == "self", (step, m)
            # (B, H, Lq, Lk): Lk is every position so far, or the last window's worth with a sliding-window cache
            assert m.shape == tuple(r.shape) and m.shape[:3] == (2, 4, step) and m.shape[3] <= stop, (step, m.shape)
            # compare real rows and columns only: eager gives NaN rows to padded queries (and NaN spreads to the
            # next layer's hidden states of that sequence); capture gives 0 there.
            real = mask[:, None, start:stop, None].bool() & mask[:, None, None, stop - m.shape[3] : stop].bool()
            real = real & torch.isfinite(r)
            assert torch.isfinite(m.weights).all()
            zero = torch.zeros((), dtype=r.dtype)
            torch.testing.assert_close(
                torch.where(real, m.weights, zero), torch.where(real, r, zero), atol=1e-5, rtol=0
            )
        start = stop
