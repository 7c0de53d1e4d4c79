"""Streaming reducers equal the same summaries computed from the stored full maps."""

import pytest
import torch
from transformers import BertConfig, BertModel

from attnkit.explain import Entropy, HeadMean, Received, Rollout, TopK, _recompute, capture, rollout


@pytest.fixture
def bert_and_inputs(hf_pair):
    cfg = BertConfig(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=3,
        intermediate_size=64,
        vocab_size=90,
        max_position_embeddings=32,
    )
    model, _ = hf_pair(BertModel, cfg)
    ids = torch.randint(0, 90, (2, 10))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def test_reducers_match_full_maps(bert_and_inputs, monkeypatch):
    model, inputs = bert_and_inputs
    with capture(model) as full:
        model(**inputs)
    maps = [m.weights for m in full.maps]
    monkeypatch.setattr(_recompute, "_TILE_ELEMENTS", 2 * 3 * 10 * 4)  # 4 query rows per tile
    reducers = [HeadMean(), Received(), Entropy(), TopK(3), Rollout(), Rollout(head_fusion="max", discard_ratio=0.2)]
    with capture(model, reducers=reducers, store=False) as rec:
        model(**inputs)
    assert all(m.weights is None for m in rec.maps) and len(rec.maps) == 3
    head_mean, received, entropy, topk, roll, roll_max = reducers
    torch.testing.assert_close(head_mean.result(), torch.stack([w.mean(1) for w in maps]))
    torch.testing.assert_close(received.result(), torch.stack([w.mean((1, 2)) for w in maps]))
    torch.testing.assert_close(received.result().sum(-1), torch.ones(3, 2))
    ent = torch.stack([-(w * w.clamp_min(1e-38).log()).sum(-1).mean(-1) for w in maps])
    torch.testing.assert_close(entropy.result(), ent)
    for (values, indices), w in zip(topk.result(), maps):
        ref = w.topk(3, -1)
        torch.testing.assert_close(values, ref.values)
        assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(roll.result(), rollout(full.maps), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        roll_max.result(), rollout(maps, head_fusion="max", discard_ratio=0.2), atol=1e-6, rtol=0
    )


def test_reducer_errors(bert_and_inputs):
    with pytest.raises(RuntimeError, match="pass it to capture"):
        Entropy().result()
    with pytest.raises(ValueError, match="positive int"):
        TopK(0)
    model, inputs = bert_and_inputs
    with pytest.raises(ValueError, match="whole square"), capture(model, reducers=[Rollout()], query_rows=[0]):
        model(**inputs)
