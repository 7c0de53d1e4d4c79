import math

import pytest
import torch

from attnkit.text.summarize import embed, sentence_scores, split_sentences, summarize

DOC = (
    "The river rose overnight. Farmers moved their cattle to higher ground before dawn. "
    "A bank near the bridge closed its doors. Officials said the water would fall by Friday.\n\n"
    "Volunteers filled sandbags in the town square. The school stayed open as a shelter. "
    "Rain is expected again next week. Engineers inspected the old dam at noon."
)


def test_split_sentences():
    assert split_sentences("One. Two! Three? four.\n\nFive") == ["One.", "Two!", "Three? four.", "Five"]
    assert split_sentences("  \n ") == []


def test_summary_keeps_ratio_in_document_order(minilm):
    result = summarize(minilm, DOC, ratio=0.25)
    n = len(result.sentences)
    assert n == 8 and len(result.selected) == math.ceil(0.25 * n)
    assert result.selected == sorted(result.selected)
    top = torch.topk(result.scores, len(result.selected)).indices.tolist()
    assert sorted(top) == result.selected
    assert result.text == " ".join(result.sentences[i] for i in result.selected)


def test_sentence_scores_are_rollout_received_attention(minilm):
    """One window, checked against rollout computed from transformers' eager attentions."""
    from transformers import AutoModel

    sentences = split_sentences(DOC)[:3]
    scores, windows = sentence_scores(minilm, sentences)
    assert windows == 1
    tok = minilm.tokenizer
    ids = [tok(s, add_special_tokens=False)["input_ids"] for s in sentences]
    flat = [tok.cls_token_id, *(i for piece in ids for i in piece), tok.sep_token_id]
    model = AutoModel.from_pretrained(str(minilm.path), attn_implementation="eager").eval()
    with torch.no_grad():
        att = model(torch.tensor([flat]), output_attentions=True).attentions
    n = len(flat)
    r = torch.eye(n, dtype=torch.float64)
    for a in att:
        a_hat = 0.5 * a[0].double().mean(0) + 0.5 * torch.eye(n, dtype=torch.float64)
        r = (a_hat / a_hat.sum(-1, keepdim=True)) @ r
    received = r.mean(0) * n
    start = 1
    for i, piece in enumerate(ids):
        expected = received[start : start + len(piece)].mean()
        torch.testing.assert_close(scores[i].double(), expected, atol=1e-4, rtol=0)
        start += len(piece)


def test_small_windows_split_the_text(minilm):
    result = summarize(minilm, DOC, ratio=0.5, max_tokens=24)
    assert result.num_windows > 1 and torch.isfinite(result.scores).all()


def test_embedding_is_unit_norm_and_closer_to_its_own_text(minilm):
    sentences = split_sentences(DOC)
    doc = embed(minilm, sentences)
    assert abs(float(doc.norm()) - 1) < 1e-5
    near = float(embed(minilm, sentences[:4]) @ doc)
    far = float(embed(minilm, ["Quantum chromodynamics describes quarks and gluons."]) @ doc)
    assert near > far


@pytest.mark.parametrize("ratio", [0, 1.5, -0.1])
def test_bad_ratio(minilm, ratio):
    with pytest.raises(ValueError, match="ratio"):
        summarize(minilm, DOC, ratio=ratio)


def test_batched_windows_equal_one_at_a_time_and_report_progress(minilm):
    sentences = split_sentences(DOC)
    calls = []
    one, windows = sentence_scores(minilm, sentences, max_tokens=24)
    batched, same = sentence_scores(
        minilm, sentences, max_tokens=24, batch_size=3, progress=lambda done, total: calls.append((done, total))
    )
    assert windows == same > 3
    torch.testing.assert_close(batched, one, atol=1e-5, rtol=0)  # padded keys get no attention
    assert calls[-1] == (windows, windows) and [d for d, _ in calls] == sorted(d for d, _ in calls)
