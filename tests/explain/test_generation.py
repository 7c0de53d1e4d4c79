"""Generation attribution with the KV cache equals the same method from one forward over the whole sequence.

References, written independently of the cached loop: ``capture`` + ``rollout`` over the full sequence;
``attnkit.explain.relevance`` over the full sequence with the explained logit as target; gradient x input by
autograd on the full sequence's embeddings. Models: the attnkit char decoder (random weights) and tiny random
Hugging Face Llama / Mistral causal LMs on ``attn_implementation="attnkit"``, all in float64.
"""

import pytest
import torch

from attnkit.explain import capture, lrp, relevance, rollout
from attnkit.explain.generation import GENERATION_METHODS, generate_attribution
from attnkit.integrations.transformers import register
from attnkit.models.char_decoder import CharDecoder
from hf_tiny import causal_lm

TOL64 = 1e-10  # float64, relative to the largest score of the row
#: Gradients of two logits vs of their difference: float64 rounding, but float32 rounding for Hugging Face Llama,
#: whose RMSNorm casts to float32 whatever the model's dtype.
LINEARITY_TOL = {"char": TOL64, "llama": 1e-5}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


def _char_decoder():
    torch.manual_seed(0)
    return CharDecoder(embed_dim=32, depth=2, num_heads=4, ffn_dim=48).double().eval()


def _hf(name):
    model = causal_lm(name)
    model.set_attn_implementation(register())
    return model.double()


MODELS = {"char": _char_decoder, "llama": lambda: _hf("llama"), "mistral": lambda: _hf("mistral")}


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _full(model, seq, length, method, foil=None):
    """Attribution of token ``seq[:, length]`` from one forward over ``seq[:, :length]`` (no cache)."""
    x = seq[:, :length]
    target = seq[:, length]
    emb = model.get_input_embeddings()(x).detach()

    def score(out):
        last = _logits(out)[:, -1]
        s = last.gather(1, target[:, None])[:, 0]
        return s if foil is None else s - last.gather(1, foil[:, None])[:, 0]

    if method in ("raw", "rollout"):
        with torch.no_grad(), capture(model) as rec:
            model(inputs_embeds=emb)
        maps = [m.weights for m in rec.maps if m.is_self]
        return maps[-1][:, :, -1].mean(1) if method == "raw" else rollout(maps)[:, -1]
    if method == "relevance":
        return relevance(model, {"inputs_embeds": emb}, score).get()[:, -1]
    if method in ("attnlrp", "cp-lrp"):
        return lrp(model, {"inputs_embeds": emb}, score, rule=method, conserve=False).relevance
    emb.requires_grad_(True)
    (grad,) = torch.autograd.grad(score(model(inputs_embeds=emb)).sum(), emb)
    return (grad * emb).sum(-1).detach()


def _close(got, ref, scale=None):
    """Equal up to float64 rounding relative to ``scale`` (default the largest reference score)."""
    assert ref.abs().max() > 0
    scale = float(ref.abs().max()) if scale is None else scale
    torch.testing.assert_close(got, ref, rtol=0, atol=TOL64 * scale)


#: Computed together in one call; the LRP rules need a call of their own.
CACHED = tuple(m for m in GENERATION_METHODS if m not in ("attnlrp", "cp-lrp"))


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_steps_equal_a_full_rerun(name):
    model = MODELS[name]()
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    n = 4
    res = generate_attribution(model, ids, max_new_tokens=n, methods=CACHED)
    assert res.sequences.shape == (2, 5 + n) and res.explained.shape == (2, n)
    for method in CACHED:
        scores = res[method]
        assert scores.shape == (2, n, 5 + n)
        for t in range(n):
            _close(scores[:, t, : 5 + t], _full(model, res.sequences, 5 + t, method))
            assert not scores[:, t, 5 + t :].any()  # the future is not attributed


@pytest.mark.parametrize("name", ["char", "llama"])
@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_lrp_through_the_cache_equals_lrp_of_a_full_rerun(name, rule):
    model = MODELS[name]()
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(5))
    res = generate_attribution(model, ids, max_new_tokens=3, methods=rule)
    for t in range(3):
        _close(res[rule][:, t, : 5 + t], _full(model, res.sequences, 5 + t, rule))
    with pytest.raises(ValueError, match="compute them in a call of their own"):
        generate_attribution(model, ids, max_new_tokens=1, methods=(rule, "rollout"))


def test_greedy_tokens_equal_transformers_generate():
    model = _hf("llama")
    ids = torch.randint(3, 90, (2, 6), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    res = generate_attribution(model, ids, max_new_tokens=5, methods="raw")
    assert torch.equal(res.sequences, ref)


@pytest.mark.parametrize("name", ["char", "llama"])
def test_batched_with_left_padding_equals_unbatched(name):
    model = MODELS[name]()
    g = torch.Generator().manual_seed(3)
    long, short = torch.randint(3, 90, (1, 7), generator=g), torch.randint(3, 90, (1, 4), generator=g)
    ids = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    batched = generate_attribution(model, ids, mask, max_new_tokens=3, methods=CACHED)
    alone = [generate_attribution(model, x, max_new_tokens=3, methods=CACHED) for x in (long, short)]
    assert torch.equal(batched.sequences[0], alone[0].sequences[0])
    assert torch.equal(batched.sequences[1, 3:], alone[1].sequences[0])
    for method in CACHED:
        _close(batched[method][0], alone[0][method][0])
        _close(batched[method][1, :, 3:], alone[1][method][0])
        assert not batched[method][1, :, :3].any()  # padding gets nothing
        got, _ = batched.matrix(method, 1)
        torch.testing.assert_close(got, alone[1][method][0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["char", "llama"])
def test_contrastive_is_the_difference_of_the_two_logits(name):
    model = MODELS[name]()
    ids = torch.randint(3, 90, (2, 5), generator=torch.Generator().manual_seed(4))
    foil = torch.tensor([7, 11])
    n = 3
    plain = generate_attribution(model, ids, max_new_tokens=n, methods="grad_input")
    seq = plain.sequences
    contrast = generate_attribution(
        model, ids, max_new_tokens=n, methods="grad_input", foil=foil, forced_tokens=seq[:, 5:]
    )
    assert torch.equal(contrast.sequences, seq)
    for t in range(n):
        # the foil logit's own attribution, from the same prefix
        of_foil = generate_attribution(
            model, seq[:, : 5 + t], max_new_tokens=1, methods="grad_input", forced_tokens=foil[:, None]
        )
        terms = plain["grad_input"][:, t, : 5 + t], of_foil["grad_input"][:, 0, : 5 + t]
        scale = max(float(x.abs().max()) for x in terms)
        got = contrast["grad_input"][:, t, : 5 + t]
        _close(got, _full(model, seq, 5 + t, "grad_input", foil=foil), scale)
        # Linearity holds to the model's own precision: HF's RMSNorm computes in float32 even in a float64 model.
        torch.testing.assert_close(got, terms[0] - terms[1], rtol=0, atol=LINEARITY_TOL[name] * scale)
        torch.testing.assert_close(
            contrast.explained[:, t], plain.explained[:, t] - of_foil.explained[:, 0], rtol=0, atol=1e-9
        )


def test_each_step_feeds_only_the_new_token():
    model = _char_decoder()
    lengths = []
    hook = model.layers[0].register_forward_pre_hook(lambda _m, args: lengths.append(args[0].shape[1]))
    try:
        generate_attribution(model, torch.randint(3, 90, (2, 6)), max_new_tokens=4, methods=CACHED)
    finally:
        hook.remove()
    assert lengths == [6, 1, 1, 1]


def test_forced_tokens_then_greedy():
    model = _char_decoder()
    ids = torch.randint(3, 90, (1, 4))
    res = generate_attribution(model, ids, max_new_tokens=3, methods="raw", forced_tokens=torch.tensor([[5]]))
    assert res.generated[0, 0] == 5
    greedy = generate_attribution(model, torch.cat([ids, torch.tensor([[5]])], 1), max_new_tokens=2, methods="raw")
    assert torch.equal(res.sequences, greedy.sequences)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"methods": "rollout", "foil": 3}, "foil needs gradient methods"),
        ({"methods": "nope"}, "unknown methods"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"attention_mask": torch.tensor([[1, 1, 1, 0]])}, "left padding"),
        ({"attention_mask": torch.tensor([[0, 2, 1, 1]])}, "0 \\(padding\\) and 1"),
        ({"forced_tokens": torch.ones(1, 5, dtype=torch.long)}, "forced_tokens"),
        ({"methods": "grad_input", "foil": torch.ones(2, dtype=torch.long)}, "foil"),
        ({"methods": "raw", "layer": 7}, "layer must be in"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    kw = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        generate_attribution(_char_decoder(), torch.randint(3, 90, (1, 4)), **kw)


def test_a_model_without_an_adapter_is_refused():
    with pytest.raises(TypeError, match="cannot step Linear"):
        generate_attribution(torch.nn.Linear(2, 2), torch.zeros(1, 2, dtype=torch.long), max_new_tokens=1)
