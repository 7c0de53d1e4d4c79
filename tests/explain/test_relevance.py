"""relevance() against Chefer et al.'s rules written out with explicit attention, and on models whose answer
is known by construction."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnkit
from attnkit.explain import relevance
from attnkit.explain.relevance import propagate_relevance


class Encoder(nn.Module):
    """A small pre-norm-free transformer encoder; ``explicit=True`` computes the probabilities by hand."""

    def __init__(self, layers=2, embed_dim=12, num_heads=3, classes=4, causal=False):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(embed_dim, 3 * embed_dim) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(embed_dim, embed_dim) for _ in range(layers))
        self.head = nn.Linear(embed_dim, classes)
        self.num_heads, self.causal, self.explicit, self.probs = num_heads, causal, False, []

    def forward(self, x):
        b, length, e = x.shape
        for qkv, proj in zip(self.blocks, self.proj):
            q, k, v = qkv(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # (B, H, L, D) each
            if self.explicit:
                s = q @ k.mT / q.shape[-1] ** 0.5
                if self.causal:
                    s = s.masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
                a = s.softmax(-1)
                a.retain_grad()
                self.probs.append(a)
                o = a @ v
            else:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
            x = x + proj(o.transpose(1, 2).reshape(b, length, e))
        return self.head(x[:, 0])


def _reference(model, x, target):
    """Eq. 5-6 of Chefer et al. written out: R = I; R += mean_h((∇A ⊙ A)^+) @ R per layer."""
    model.explicit, model.probs = True, []
    model(x)[torch.arange(x.shape[0]), target].sum().backward()
    model.explicit = False
    r = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
    for a in model.probs:
        r = r + (a.grad * a).clamp_min(0).mean(1) @ r
    return r


def test_encoder_relevance_equals_the_rules_written_out():
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(3, 7, 12)
    target = torch.tensor([0, 3, 1])
    got = relevance(model, x, target)
    assert got.streams == ["blocks"] or len(got.streams) == 1
    torch.testing.assert_close(got.get(), _reference(model, x, target), atol=1e-6, rtol=1e-5)
    assert got.output.shape == (3, 4)
    assert all(not m.weights.requires_grad for m in got.records)


def test_decoder_relevance_is_causal():
    torch.manual_seed(1)
    model = Encoder(causal=True).eval()
    x = torch.randn(2, 6, 12)
    r = relevance(model, x, target=lambda out: out[:, 2]).get()
    assert torch.equal(r.triu(1), torch.zeros_like(r))
    torch.testing.assert_close(r, _reference(model, x, torch.tensor([2, 2])), atol=1e-6, rtol=1e-5)


class Evidence(nn.Module):
    """Uniform attention (zero queries); the score reads token 0's attention output of feature 0."""

    def forward(self, x):
        q = torch.zeros_like(x[:, None])  # (B, 1, L, E)
        return F.scaled_dot_product_attention(q, x[:, None], x[:, None])[:, 0, 0, :1]


def test_known_by_construction_encoder():
    x = torch.zeros(4, 6, 2)
    where = torch.tensor([3, 1, 5, 2])
    x[torch.arange(4), where, 0] = 1.0  # the only evidence sits at `where`
    r = relevance(Evidence(), x, target=0).get()
    assert torch.equal(r[:, 0, 1:].argmax(-1) + 1, where)
    # Token 0's row: its own identity plus (1/L) on the evidence token, nothing else.
    expected = torch.zeros(4, 6)
    expected[:, 0] = 1.0
    expected[torch.arange(4), where] += 1 / 6
    torch.testing.assert_close(r[:, 0], expected)


class EncDec(nn.Module):
    """Encoder self-attention (attnkit) then decoder cross-attention (SDPA), both uniform."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Block("attnkit")])
        self.decoder = nn.ModuleList([Block("cross")])

    def forward(self, src, tgt):
        mem = self.encoder[0](src, src)
        return self.decoder[0](tgt, mem)[:, 0, :1]


class Block(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x, mem):
        q = torch.zeros_like(x[:, None])
        if self.how == "attnkit":
            return x + attnkit.attention(q, mem[:, None], mem[:, None])[:, 0]
        return F.scaled_dot_product_attention(q, mem[:, None], mem[:, None], **{})[:, 0]


def test_known_by_construction_cross_attention():
    src = torch.zeros(3, 5, 2)
    where = torch.tensor([4, 0, 2])
    src[torch.arange(3), where, 0] = 1.0
    tgt = torch.zeros(3, 2, 2)
    got = relevance(EncDec(), (src, tgt), target=0)
    assert got.streams == ["encoder", "decoder"]
    kinds = [m.kind for m in got.records]
    assert kinds == ["self", "cross"]
    cross = got.get("decoder", "encoder")
    assert cross.shape == (3, 2, 5)
    assert torch.equal(cross[:, 0].argmax(-1), where)
    assert torch.equal(got.get("decoder", "decoder"), torch.eye(2).expand(3, 2, 2))


def test_mha_need_weights_true_still_differentiable():
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            out, w = self.attn(x, x, x)  # default need_weights=True, averaged weights
            assert w is not None and w.shape == (x.shape[0], x.shape[1], x.shape[1])
            return out[:, 0]

    got = relevance(Wrap(), torch.randn(2, 5, 8), target=1)
    assert got.get().shape == (2, 5, 5)
    assert float((got.get() - torch.eye(5)).abs().sum()) > 0  # the gradient reached the map


def test_errors():
    with pytest.raises(ValueError, match="target must be a class index"):
        relevance(Encoder(), torch.randn(2, 4, 12), target=9)
    with pytest.raises(RuntimeError, match="no attention"):
        relevance(nn.Linear(3, 2), torch.randn(2, 3), target=0)
    a = torch.rand(1, 1, 3, 3)
    with pytest.raises(ValueError, match="mismatched token counts"):
        propagate_relevance([a, torch.rand(1, 1, 4, 4)], [a, None], ["self", "self"], ["l.0", "l.1"])


def test_hf_bert_relevance_matches_eager_attentions_reference(hf_pair):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=60,
        max_position_embeddings=32,
        num_labels=3,
    )
    sdpa, eager = hf_pair(BertForSequenceClassification, cfg)
    ids = torch.randint(0, 60, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    got = relevance(sdpa, {"input_ids": ids, "attention_mask": mask}, target=torch.tensor([2, 0]))
    # Reference: transformers' eager attentions are the probabilities on the autograd path of the logits.
    out = eager(input_ids=ids, attention_mask=mask, output_attentions=True)
    score = out.logits[torch.arange(2), torch.tensor([2, 0])].sum()
    grads = torch.autograd.grad(score, out.attentions)
    r = torch.eye(9).expand(2, 9, 9)
    for a, g in zip(out.attentions, grads):
        r = r + (g * a).clamp_min(0).mean(1) @ r
    torch.testing.assert_close(got.get(), r.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.output.logits, out.logits.detach(), atol=1e-5, rtol=0)
