"""AttnLRP / CP-LRP against the papers' rules written out as explicit relevance propagation (float64)."""

import pytest
import torch
from torch import nn

from attnkit.explain.lrp import lrp
from lrp_reference import E, Encoder, L, reference


@pytest.mark.parametrize("conserve", [False, True])
def test_attnlrp_matches_the_rules_written_out(conserve):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(3, L, E, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    got = lrp(model, x, target, conserve=conserve)
    assert got.relevance.shape == (3, L) and got.relevance.dtype == torch.float64
    for b in range(3):
        want = reference(model, x[b], int(target[b]), conserve)
        torch.testing.assert_close(got.relevance[b], want, rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(got.logit, model(x).gather(1, target[:, None])[:, 0])


@pytest.mark.parametrize("norm_first", [True, False])
def test_published_rules_leak_where_the_papers_say(norm_first):
    """Without biases CP-LRP's rules are all linear: the input relevance sums to the logit. AttnLRP's softmax rule
    has a bias term (Prop. 3.1), so it does not."""
    torch.manual_seed(1)
    model = Encoder(norm_first=norm_first, layers=2).eval()
    x = torch.randn(4, L, E, dtype=torch.float64)
    assert float(lrp(model, x, 2, rule="cp-lrp", conserve=False).conservation.max()) < 1e-10
    assert float(lrp(model, x, 2, conserve=False).conservation.max()) > 1e-4


@pytest.mark.parametrize("rule", ["attnlrp", "cp-lrp"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_conserve_sums_to_the_logit_with_biases(rule, norm_first):
    torch.manual_seed(4)
    model = Encoder(bias=True, norm_first=norm_first, layers=2).eval()
    with torch.no_grad():
        for p in model.parameters():  # biases far from 0, so that a bias that keeps relevance shows
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(4, L, E, dtype=torch.float64)
    assert float(lrp(model, x, 1, rule=rule, conserve=False).conservation.min()) > 1e-3
    got = lrp(model, x, 1, rule=rule)
    assert float(got.conservation.max()) < 1e-10


def test_conserve_on_a_vit():
    """A ViT with class-token and with mean pooling (biases after the pooling have no token) conserves, at its
    tokens and at its pixels (the patch embedding's bias and the position embeddings included)."""
    from attnkit.vision import VisionTransformer

    torch.manual_seed(5)
    for pool in ("token", "mean"):
        vit = VisionTransformer(
            image_size=16,
            patch_size=4,
            in_chans=1,
            num_classes=3,
            embed_dim=16,
            depth=2,
            num_heads=2,
            pool=pool,
            dtype=torch.float64,
        ).eval()
        with torch.no_grad():
            for p in vit.parameters():
                p.add_(0.2 * torch.randn_like(p))
        image = torch.randn(2, 1, 16, 16, dtype=torch.float64)
        got = lrp(vit, image, 0)
        assert got.relevance.shape == (2, 16, 16) and got.token_relevance.shape == (2, 17)
        assert float(got.conservation.max()) < 1e-10
        tokens = lrp(vit, image, 0, pixels=False)
        assert tokens.relevance.shape == (2, 17) and float(tokens.conservation.max()) < 1e-10
        torch.testing.assert_close(tokens.relevance, got.token_relevance, rtol=1e-12, atol=1e-12)


def test_hooks_are_removed_and_outputs_unchanged():
    torch.manual_seed(2)
    model = Encoder(bias=True).eval()
    x = torch.randn(2, L, E, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    got = lrp(model, x, lambda out: out[:, 1])
    torch.testing.assert_close(got.output, before)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="rule must be"):
        lrp(model, x, 0, rule="lrp-0")
    with pytest.raises(ValueError, match="no attnkit"):
        lrp(nn.Linear(3, 3), torch.randn(1, 3), 0)


def test_bert_padding_gets_no_relevance():
    from attnkit.models.bert import BertConfig, BertModel

    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)
    model = BertModel(cfg, dtype=torch.float64).eval()
    inputs = {
        "input_ids": torch.tensor([[2, 7, 9, 0], [3, 4, 5, 6]]),
        "attention_mask": torch.tensor([[1, 1, 1, 0]] * 2),
    }
    for rule in ("attnlrp", "cp-lrp"):
        got = lrp(model, inputs, lambda out: out[:, 0, 3], rule=rule)
        assert got.relevance.shape == (2, 4) and float(got.relevance[:, 3].abs().max()) == 0.0
        assert bool(torch.isfinite(got.conservation).all())


def test_char_decoder_next_token_conserves():
    """attnkit's decoder-only CharDecoder (causal RoPE blocks): the next-character logit."""
    from attnkit.models.char_decoder import CharDecoder

    torch.manual_seed(6)
    model = CharDecoder(embed_dim=16, depth=2, num_heads=2, ffn_dim=24, dtype=torch.float64).eval()
    ids = torch.randint(2, 40, (3, 9))
    with torch.no_grad():
        token = model(ids).argmax(-1)[:, -1]
    got = lrp(model, ids, lambda out: out[:, -1].gather(1, token[:, None])[:, 0])
    assert got.relevance.shape == (3, 9) and float(got.conservation.max()) < 1e-10


def test_seq2seq_reads_the_source_and_refuses_conserve():
    from attnkit.ablation.seq2seq import build_seq2seq

    torch.manual_seed(7)
    model = build_seq2seq("transformer", 20, 15).double().eval()
    src, lengths, tgt = torch.randint(3, 20, (2, 7)), torch.tensor([7, 7]), torch.randint(3, 15, (2, 4))
    with pytest.raises(ValueError, match="conserve=False"):
        lrp(model, (src, lengths, tgt), lambda out: out[:, 1, 3])
    got = lrp(model, (src, lengths, tgt), lambda out: out[:, 1, 3], conserve=False)
    assert got.relevance.shape == (2, 7)
