"""AttnLRP / CP-LRP on Hugging Face models run with attn_implementation="attnkit" (float64)."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from attnkit.explain.lrp import lrp
from attnkit.integrations.transformers import register
from attnkit.models.bert import BertModel
from hf_tiny import _bert, _ids, causal_lm


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register()


def _tiny_bert():
    model = _bert().double()
    with torch.no_grad():  # transformers initialises biases to 0: make them absorb something
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    model.set_attn_implementation("attnkit")
    return model


def _pooled(out):
    return out.pooler_output[:, 0]


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
def test_tiny_bert_conserves_per_example_and_ignores_padding(rule):
    model, inputs = _tiny_bert(), _ids(left=0)  # the pooler reads position 0: a real token
    got = lrp(model, inputs, _pooled, rule=rule)
    assert got.relevance.shape == inputs["input_ids"].shape
    assert float(got.conservation.max()) < 1e-9
    pad = inputs["attention_mask"] == 0
    assert float(got.relevance[pad].abs().max()) == 0.0 and float(got.relevance[~pad].abs().min()) > 0
    with torch.no_grad():
        torch.testing.assert_close(got.logit, _pooled(model(**inputs)), rtol=0, atol=0)
    published = lrp(model, inputs, _pooled, rule=rule, conserve=False)  # biases (and the softmax) absorb some
    assert float(published.conservation.min()) > 1e-4


def test_not_through_attnkit_is_an_error():
    model, inputs = _tiny_bert(), _ids()
    model.set_attn_implementation("eager")
    with pytest.raises(ValueError, match='attn_implementation="attnkit"'):
        lrp(model, inputs, _pooled)


def test_minilm_through_hf_equals_attnkit_bert(minilm_dir):
    """The shipped all-MiniLM-L6-v2: Hugging Face's BertModel on attnkit attention and attnkit's own BertModel with
    the same weights give the same relevance (the same rules reached through two implementations)."""
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    batch = tok(["a man is playing a guitar", "the cat sat"], padding=True, return_tensors="pt")
    hf = AutoModel.from_pretrained(minilm_dir, attn_implementation="attnkit").eval().double()
    ours = BertModel.from_pretrained(minilm_dir, dtype=torch.float64).eval()
    direction = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mask = batch["attention_mask"][..., None].double()

    def score(hidden):  # the mean-pooled sentence embedding along a fixed direction
        return ((hidden * mask).sum(1) / mask.sum(1)) @ direction

    for conserve in (True, False):
        a = lrp(hf, dict(batch), lambda out: score(out.last_hidden_state), conserve=conserve)
        b = lrp(ours, dict(batch), score, conserve=conserve)
        torch.testing.assert_close(a.logit, b.logit, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-6, atol=1e-8)
        assert float(a.conservation.max()) < 1e-9 if conserve else float(a.conservation.min()) > 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_decoders_with_gated_mlps_conserve(name):
    """Llama (RMSNorm, RoPE, grouped-query attention, gated SiLU MLP) and Qwen2 (q/k/v biases, sliding windows):
    the next-token logit of a left-padded batch (benchmarks/lrp_lxt.py checks the same rules against lxt)."""
    model = causal_lm(name).double()
    model.set_attn_implementation("attnkit")
    inputs = _ids(right=0)
    with torch.no_grad():
        token = model(**inputs).logits[:, -1].argmax(-1)

    def score(out):
        return out.logits[:, -1].gather(1, token[:, None])[:, 0]

    for rule in ("attnlrp", "cp-lrp"):
        got = lrp(model, inputs, score, rule=rule)
        # transformers' RMSNorm computes in float32 even in a float64 model: the rule's linear map and the value
        # it rewires differ by float32 rounding
        assert float(got.conservation.max()) < 1e-6
        assert float(got.relevance[inputs["attention_mask"] == 0].abs().max()) == 0.0
    assert float(lrp(model, inputs, score, conserve=False).conservation.min()) > 1e-3
