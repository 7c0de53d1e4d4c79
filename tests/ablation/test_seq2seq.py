"""Seq2seq models of the date ablation: shapes, padding invariance, greedy == teacher-forced argmax, alignments."""

from __future__ import annotations

import pytest
import torch

from attnkit.ablation.cost import count_macs
from attnkit.ablation.dates import BOS, PAD
from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS, GRUSeq2Seq, build_seq2seq

SRC_VOCAB, TGT_VOCAB, STEPS = 23, 15, 6


def _batch():
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([7, 3, 5])
    src = torch.randint(4, SRC_VOCAB, (3, 7), generator=g)
    src[torch.arange(7)[None, :] >= lengths[:, None]] = PAD
    return src, lengths


def _model(name):
    torch.manual_seed(0)
    return build_seq2seq(name, SRC_VOCAB, TGT_VOCAB).eval()


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_shapes_and_greedy_matches_teacher_forcing(name):
    model = _model(name)
    src, lengths = _batch()
    with torch.no_grad():
        out = model.generate(src, lengths, STEPS, with_alignments=True)
        assert out.tokens.shape == (3, STEPS) and out.tokens.dtype == torch.int64
        tgt_in = torch.cat([torch.full((3, 1), BOS), out.tokens[:, :-1]], 1)
        logits = model(src, lengths, tgt_in)
    assert logits.shape == (3, STEPS, TGT_VOCAB)
    assert torch.equal(logits.argmax(-1), out.tokens)
    if name == "none":
        assert out.alignments is None
    else:
        w = out.alignments
        assert w.shape == (3, STEPS, 7)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, STEPS))
        assert float(w[1, :, 3:].abs().max()) == 0.0  # padded source positions get no weight


@pytest.mark.parametrize("name", SEQ2SEQ_MODELS)
def test_padding_invariance(name):
    """A source decodes the same alone and in a batch padded to a longer source."""
    model = _model(name)
    src, lengths = _batch()
    tgt_in = torch.randint(1, TGT_VOCAB, (3, STEPS), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        together = model(src, lengths, tgt_in)
        alone = model(src[1:2, :3], lengths[1:2], tgt_in[1:2])
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_alignments_off_by_default_and_attention_costs_macs():
    src, lengths = _batch()
    assert _model("additive").generate(src, lengths, STEPS).alignments is None
    macs = {n: count_macs(lambda n=n: _model(n).generate(src[:1], lengths[:1], STEPS)) for n in SEQ2SEQ_MODELS}
    assert macs["none"] > 0 and macs["additive"] > macs["none"] and macs["luong"] > macs["none"]


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown model 'lstm'; valid: none, additive, luong, transformer"):
        build_seq2seq("lstm", 5, 5)
    with pytest.raises(ValueError, match="unknown attention 'dot'"):
        GRUSeq2Seq(5, 5, attention="dot")
    with pytest.raises(ValueError, match="hidden_dim"):
        GRUSeq2Seq(5, 5, hidden_dim=0)
