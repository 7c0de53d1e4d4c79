import pytest
import torch

from attnkit.text.contextual import find_word, layer_similarity, word_in_context

RIVER, CASH = "I sat on the bank of the river", "I deposited cash at the bank"


def test_rows_and_hidden_states_match_transformers(minilm):
    from transformers import AutoModel

    wic = word_in_context(minilm, RIVER, "bank")
    model = AutoModel.from_pretrained(str(minilm.path), attn_implementation="eager").eval()
    batch = minilm.encode([RIVER])
    with torch.no_grad():
        out = model(**batch, output_attentions=True, output_hidden_states=True)
    i = wic.index
    assert wic.tokens[i] == "bank"
    expected_rows = torch.stack([a[0, :, i] for a in out.attentions])
    torch.testing.assert_close(wic.attention, expected_rows, atol=1e-6, rtol=0)
    expected_hidden = torch.stack([h[0, i] for h in out.hidden_states])
    torch.testing.assert_close(wic.hidden, expected_hidden, atol=1e-4, rtol=1e-4)


def test_senses_separate_and_similarity_is_cosine(minilm):
    a, b = word_in_context(minilm, RIVER, "bank"), word_in_context(minilm, CASH, "bank")
    sim = layer_similarity(a, b)
    assert sim.shape == (7,)
    manual = torch.nn.functional.cosine_similarity(a.hidden[-1], b.hidden[-1], dim=0)
    torch.testing.assert_close(sim[-1], manual)
    assert sim[-1] < sim[0]  # context pulls the two senses apart
    top = a.top(5, k=2, skip=("[CLS]", "[SEP]"))
    assert len(top) == 2 and all(t not in ("[CLS]", "[SEP]") for t, _ in top)


def test_missing_word_lists_tokens():
    with pytest.raises(ValueError, match="not a token of the sentence"):
        find_word(["[CLS]", "river", "[SEP]"], "bank")
    assert find_word(["[CLS]", "Ġbank", "[SEP]"], "bank") == 1
