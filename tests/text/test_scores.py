"""Token scores against transformers' eager attentions (output_attentions=True) on the real MiniLM."""

import pytest
import torch

from attnkit.text import load_text_model, token_scores, top_tokens
from attnkit.text.models import TextModelError

TEXTS = ["I sat on the bank of the river", "I deposited cash at the bank"]


@pytest.fixture(scope="module")
def eager_attentions(minilm):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(str(minilm.path), attn_implementation="eager").eval()
    batch = minilm.encode(TEXTS)
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    return batch, [a.double() for a in out.attentions]


def test_raw_scores_are_the_cls_row_of_the_eager_map(minilm, eager_attentions):
    batch, att = eager_attentions
    mask = batch["attention_mask"].double()
    for layer, head in [(5, None), (0, 3), (-2, None)]:
        got = token_scores(minilm, batch, method="raw", layer=layer, head=head)
        ref = att[layer].mean(1)[:, 0] if head is None else att[layer][:, head, 0]
        torch.testing.assert_close(got.double(), ref * mask, atol=1e-6, rtol=0)


def test_rollout_scores_follow_the_paper_formula(minilm, eager_attentions):
    batch, att = eager_attentions
    got = token_scores(minilm, batch, method="rollout")
    for b in range(2):
        n = int(batch["attention_mask"][b].sum())
        r = torch.eye(n, dtype=torch.float64)
        for a in att:  # Abnar & Zuidema 2020: A_hat = 0.5 A + 0.5 I, rows renormalised, R = A_L ... A_1
            a_hat = 0.5 * a[b, :, :n, :n].mean(0) + 0.5 * torch.eye(n, dtype=torch.float64)
            r = (a_hat / a_hat.sum(-1, keepdim=True)) @ r
        torch.testing.assert_close(got[b, :n].double(), r[0], atol=1e-5, rtol=0)
        assert (got[b, n:] == 0).all()


@pytest.mark.parametrize("method", ["flow", "relevance"])
def test_flow_and_relevance_give_distributions_over_real_tokens(minilm, method):
    batch = minilm.encode(TEXTS)
    scores = token_scores(minilm, batch, method=method)
    mask = batch["attention_mask"].bool()
    assert scores.shape == mask.shape and torch.isfinite(scores).all()
    assert (scores[~mask] == 0).all() and (scores[mask] >= 0).all()
    # "bank" is among the content words the sentence embedding draws on most, in both senses.
    for b in range(2):
        top = [t for t, _ in top_tokens(minilm.tokens(batch["input_ids"][b]), scores[b], k=len(TEXTS[b].split()))]
        assert "bank" in top


def test_gpt2_family_runs_through_transformers_sdpa(tiny_gpt2_dir):
    tm = load_text_model(tiny_gpt2_dir)
    assert tm.family == "gpt2" and tm.summary_row == "last"
    batch = tm.encode(["the cat sat on the mat", "the dog sat"])
    raw = token_scores(tm, batch, method="raw", layer=1)
    # the last real token is causal: it attends only to real tokens, and its row sums to 1.
    torch.testing.assert_close(raw.sum(-1), torch.ones(2), atol=1e-5, rtol=0)
    assert (raw[1, 3:] == 0).all()


def test_loader_errors(tmp_path):
    with pytest.raises(TextModelError, match="not a directory"):
        load_text_model(tmp_path / "missing")
    with pytest.raises(TextModelError, match=r"no config\.json"):
        load_text_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(TextModelError, match=r"cannot load its tokenizer|not supported"):
        load_text_model(tmp_path)


def test_bad_layer_or_method(minilm):
    batch = minilm.encode(TEXTS[:1])
    with pytest.raises(ValueError, match="layer must be in"):
        token_scores(minilm, batch, method="raw", layer=6)
    with pytest.raises(ValueError, match="method must be one of"):
        token_scores(minilm, batch, method="gradcam")
