"""attn_implementation="attnkit" against transformers' eager attention on tiny random models of 13 architectures."""

import pytest
import torch

import attnkit
from attnkit.integrations import _hf_mask
from attnkit.integrations.transformers import _effective_window, choose_backend, register
from hf_tiny import CASES, Case, eager_softmax_in_float64

#: Tolerances. float64 runs: attnkit vs eager agree to rounding. float32 runs: the issue's bounds (outputs 1e-4,
#: weights 1e-5), or, where the float32 eager model itself is further than that from its float64 run (sharp maps
#: from initializer_range=1.0 amplify rounding through the layers), at most 2x eager's own float32 error.
TOL64 = 1e-9
OUT_TOL32, WEIGHT_TOL32 = 1e-4, 1e-5


@pytest.fixture(scope="module", autouse=True)
def _registered():
    assert register() == "attnkit"


@torch.no_grad()
def _run(model, impl, inputs, dtype=torch.float32, **kw):
    model.to(dtype).set_attn_implementation(impl)
    inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    return model(**inputs, **kw)


def _rows(real, t):
    """The rows of ``t`` (B, L, ...) whose query is real (all rows when ``real`` is None)."""
    return t if real is None or t.shape[:2] != real.shape else t[real]


_MAP_KINDS = ("attentions", "encoder_attentions", "decoder_attentions", "cross_attentions")


def _compared(case: Case, out, real) -> list[torch.Tensor]:
    """Every tensor compared: the outputs' real rows and every attention map's real query rows, as float64."""
    tensors = [_rows(real, t) for t in case.outputs(out)]
    nested = [getattr(out, k) for k in ("text_model_output", "vision_model_output") if hasattr(out, k)]
    for src, kind in [(o, k) for o in (out, *nested) for k in _MAP_KINDS]:
        maps = getattr(src, kind, None)
        for w in maps or ():
            assert w is not None, kind
            # queries of real tokens only: eager gives uniform rows to queries with no key left, attnkit 0
            tensors.append(w.transpose(1, 2)[real] if kind == "attentions" and real is not None else w)
    return [t.double() for t in tensors]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_outputs_and_attentions_match_eager(case: Case, monkeypatch):
    model, inputs = case.build(), case.inputs()
    real = case.real(inputs)
    n_out = len(case.outputs(_run(model, "eager", inputs)))
    runs = {
        (impl, dtype): _compared(case, _run(model, impl, inputs, dtype, output_attentions=True), real)
        for impl in ("attnkit", "eager")
        for dtype in (torch.float32, torch.float64)
    }
    eager_softmax_in_float64(monkeypatch)
    runs["eager", torch.float64] = _compared(
        case, _run(model, "eager", inputs, torch.float64, output_attentions=True), real
    )
    truth = runs["eager", torch.float64]
    assert len(runs["attnkit", torch.float64]) == len(truth) > n_out  # outputs and attention maps
    for i, (ours64, ours32, eager32, ref) in enumerate(
        zip(runs["attnkit", torch.float64], runs["attnkit", torch.float32], runs["eager", torch.float32], truth)
    ):
        assert ours64.shape == ref.shape
        torch.testing.assert_close(ours64, ref, atol=TOL64, rtol=0.0)
        bound = max(OUT_TOL32 if i < n_out else WEIGHT_TOL32, 2 * float((eager32 - ref).abs().max()))
        assert float((ours32 - ref).abs().max()) <= bound, (i, float((ours32 - ref).abs().max()), bound)
    model.to(torch.float32).set_attn_implementation("attnkit")
    with torch.no_grad():  # without output_attentions: the fused path, same outputs, no weights
        plain = model(**inputs)
    for a, eager32, ref in zip(case.outputs(plain), runs["eager", torch.float32], truth[:n_out]):
        bound = max(OUT_TOL32, 2 * float((eager32 - ref).abs().max()))
        assert float((_rows(real, a).double() - ref).abs().max()) <= bound


def test_a_dropped_padding_mask_would_be_caught(monkeypatch):
    """The comparison above can fail: the same model with the padding removed from attnkit's mask is off by O(1)."""
    case = next(c for c in CASES if c.name == "llama")
    model, inputs = case.build(), case.inputs()
    real = case.real(inputs)
    ref = _run(model, "eager", inputs).last_hidden_state
    original = _hf_mask.hf_mask

    def no_padding(*args, **kwargs):
        kwargs["attention_mask"] = None
        return original(*args, **kwargs)

    monkeypatch.setattr(_hf_mask, "hf_mask", no_padding)
    from transformers.masking_utils import AttentionMaskInterface

    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "attnkit", no_padding)
    out = _run(model, "attnkit", inputs).last_hidden_state
    assert (out[real] - ref[real]).abs().max() > 0.1


def test_padding_is_not_materialised_for_standard_patterns():
    from transformers import masking_utils as mu

    pad = torch.ones(2, 9, dtype=torch.bool)
    pad[0, :3] = False
    m = _hf_mask.hf_mask(2, 9, 9, mask_function=mu.sliding_window_causal_mask_function(4), attention_mask=pad)
    assert m.dense is None and m.is_causal and m.window == (3, 0) and m.padding.shape == (2, 9)
    m = _hf_mask.hf_mask(2, 9, 9, mask_function=mu.bidirectional_mask_function, attention_mask=pad)
    assert m.dense is None and not m.is_causal and m.window is None
    # a pattern it does not know: HF's own dense mask, exact
    chunked = mu.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    m = _hf_mask.hf_mask(2, 9, 9, mask_function=chunked, attention_mask=pad)
    ref = mu.sdpa_mask(2, 9, 9, mask_function=chunked, attention_mask=pad, allow_is_causal_skip=False)
    assert m.dense is not None and torch.equal(m.dense, ref)


def test_static_cache_offsets_keep_only_visible_keys():
    from transformers import masking_utils as mu

    # prefill of 5 tokens into a static cache of 16 slots: keys 5..15 are empty
    m = _hf_mask.hf_mask(1, 5, 16, q_offset=torch.tensor(0), mask_function=mu.causal_mask_function)
    assert m.visible_keys() == 5
    # chunk of 4 after 6 cached tokens
    m = _hf_mask.hf_mask(1, 4, 16, q_offset=6, mask_function=mu.causal_mask_function)
    assert m.visible_keys() == 10


def test_register_is_idempotent_and_checks_names(monkeypatch):
    assert register() == "attnkit"
    assert register() == "attnkit"
    for bad in ("attnkit_sdpa", "my_flash", "flexible", "", "eager"):
        with pytest.raises(ValueError, match="name"):
            register(bad)
    with pytest.raises(ValueError, match="already registered with backend"):
        register("attnkit", backend="math")
    with pytest.raises(ValueError, match="unknown backend"):
        register("attnkit_x", backend="nope")
    from transformers import AttentionInterface

    monkeypatch.setitem(AttentionInterface._global_mapping, "someone_else", lambda *a, **k: None)
    with pytest.raises(ValueError, match="already has"):
        register("someone_else")


def test_unknown_hf_keyword_raises():
    from attnkit.integrations.transformers import attention_forward

    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="head_mask"):
        attention_forward(torch.nn.Module(), q, q, q, None, head_mask=torch.ones(2))


def test_long_prompt_routing():
    long, short = 4096, 512
    kw = dict(softcap=None, sinks=None, padded_causal=False, return_weights=False)
    assert choose_backend(long, long, window=(4095, 0), **kw) == "blocksparse"
    assert choose_backend(short, short, window=(4095, 0), **kw) == "auto"
    assert choose_backend(long, long, window=None, **{**kw, "softcap": 50.0}) == "tiled"
    assert choose_backend(long, long, window=None, **{**kw, "padded_causal": True}) == "tiled"
    assert choose_backend(long, long, window=None, **kw) == "auto"
    assert choose_backend(long, long, window=(4095, 0), **{**kw, "return_weights": True}) == "auto"


def test_a_window_that_removes_nothing_is_dropped():
    assert _effective_window((4095, 0), True, 2048, 2048) is None  # Mistral's window on a shorter prompt
    assert _effective_window((3, 0), True, 9, 9) == (3, 0)
    assert _effective_window((8, 8), False, 9, 9) is None
    assert _effective_window((8, 7), False, 9, 9) == (8, 7)  # row 0 does not see key 8
    assert _effective_window((-1, 0), True, 9, 9) is None


def test_dropout_in_training_uses_the_same_random_stream_as_eager():
    """With output_attentions (both run the probabilities through F.dropout on the same (B, H, L, L) layout), a
    training-mode forward under the same seed gives eager's output: dropout is applied, with HF's probability."""
    case = next(c for c in CASES if c.name == "llama")
    model, inputs = case.build(), case.inputs()
    model.config.attention_dropout = 0.5
    for layer in model.layers:
        layer.self_attn.attention_dropout = 0.5
    model.train()
    real = case.real(inputs)
    outs = {}
    for impl in ("eager", "attnkit"):
        model.set_attn_implementation(impl)
        torch.manual_seed(7)
        with torch.no_grad():
            outs[impl] = model(**inputs, output_attentions=True).last_hidden_state
    torch.testing.assert_close(outs["attnkit"][real], outs["eager"][real], atol=1e-4, rtol=1e-4)
    model.eval()
    with torch.no_grad():
        evaluated = model(**inputs).last_hidden_state
    assert (evaluated[real] - outs["attnkit"][real]).abs().max() > 0.1  # dropout did something


@pytest.mark.parametrize(
    "kwargs, backend",
    [({"sliding_window": 256}, "blocksparse"), ({"softcap": 30.0}, "tiled"), ({}, "auto")],
    ids=["window", "softcap", "plain-causal"],
)
def test_long_prompts_are_routed_and_stay_exact(monkeypatch, kwargs, backend):
    """At 2048 x 2048 scores the adapter picks the backend (no L x L tensor), and the result and the gradients
    of a training step (what fine-tuning a Hugging Face model on attnkit runs) equal math's."""
    from attnkit.integrations import transformers as adapter

    seen = []

    def spy(*args, **kw):
        seen.append(kw["backend"])
        return attnkit.attention(*args, **kw)

    monkeypatch.setattr(adapter, "attention", spy)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 2048, 8, generator=g).requires_grad_(True) for h in (2, 1, 1))
    module = torch.nn.Module()
    module.is_causal = True
    mask = _hf_mask.HFMask(2048, 2048, 0, True, None if "sliding_window" not in kwargs else (255, 0))
    out, weights = adapter.attention_forward(module, q, k, v, mask, **kwargs)
    assert seen == [backend] and weights is None
    window = (255, 0) if "sliding_window" in kwargs else None
    ref = attnkit.attention(
        q, k, v, is_causal=True, window_size=window, softcap=kwargs.get("softcap"), backend="math"
    ).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    expected = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # float32, sums over 2048 keys
