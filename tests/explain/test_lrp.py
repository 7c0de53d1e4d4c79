"""AttnLRP / CP-LRP against the papers' rules written out as explicit relevance propagation (float64)."""

import math

import pytest
import torch
from torch import nn

from attnkit.explain.lrp import lrp
from attnkit.nn import TransformerEncoderLayer

E, H, F_DIM, L = 12, 3, 20, 5


class Encoder(nn.Module):
    def __init__(self, *, bias=False, norm_first=True, layers=1):
        super().__init__()
        opts = {"ffn_dim": F_DIM, "bias": bias, "norm_first": norm_first, "activation": "gelu"}
        self.layers = nn.ModuleList(TransformerEncoderLayer(E, H, dtype=torch.float64, **opts) for _ in range(layers))
        self.head = nn.Linear(E, 4, bias=bias, dtype=torch.float64)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x[:, 0])


def _linear(x, w, r_out):
    """ε-rule, ε = 0 (Montavon et al. 2019, Eq. 4): R_i = Σ_j x_i w_ji R_j / z_j."""
    return x * ((r_out / (x @ w.T)) @ w)


def _layer_norm(x, ln, r_out):
    """LN-rule (Ali et al. 2022): the normalisation with sigma constant is a linear map J; R = x ⊙ Jᵀ(R_out / y)."""
    c = x - x.mean(-1, keepdim=True)
    sigma = (c.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt()
    y = ln.weight * c / sigma
    v = ln.weight / sigma * (r_out / y)
    return x * (v - v.mean(-1, keepdim=True))


def _share(a, b, r_out):
    """A sum a + b passes R in proportion to each term."""
    return a / (a + b) * r_out, b / (a + b) * r_out


def _attention(u, mha, r_out, conserve=False):
    """AttnLRP for one head-split attention (Achtibat et al. 2024, Prop. 3.1 and 3.2), and the relevance the softmax
    rule absorbs per query row, summed over heads ``(L,)``."""
    d = E // H
    q = (u @ mha.q_proj.weight.T).unflatten(-1, (H, d)).transpose(0, 1)  # (H, L, D)
    k = (u @ mha.k_proj.weight.T).unflatten(-1, (H, d)).transpose(0, 1)
    v = (u @ mha.v_proj.weight.T).unflatten(-1, (H, d)).transpose(0, 1)
    scale = 1 / math.sqrt(d)
    s = scale * q @ k.mT  # (H, L, L)
    a = s.softmax(-1)
    o = a @ v  # (H, L, D)
    concat = o.transpose(0, 1).flatten(-2)
    r_o = _linear(concat, mha.out_proj.weight, r_out).unflatten(-1, (H, d)).transpose(0, 1)
    c = a[..., None] * v[:, None, :, :]  # (H, i, j, D): A_ij v_jd
    ratio = r_o / o  # (H, i, D)
    r_a = 0.5 * (c * ratio[:, :, None, :]).sum(-1)  # uniform rule, half to A
    r_v = 0.5 * (c * ratio[:, :, None, :]).sum(1)  # half to v
    r_s = s * (r_a - a * r_a.sum(-1, keepdim=True))  # softmax rule
    absorbed = (r_a.sum(-1) - r_s.sum(-1)).sum(0)
    cq = scale * q[:, :, None, :] * k[:, None, :, :]  # (H, i, j, D): scale q_id k_jd
    ratio_s = (r_s / s)[..., None]
    r_q = 0.5 * (cq * ratio_s).sum(2)
    r_k = 0.5 * (cq * ratio_s).sum(1)
    back = [
        _linear(u, w, r.transpose(0, 1).flatten(-2))
        for w, r in ((mha.q_proj.weight, r_q), (mha.k_proj.weight, r_k), (mha.v_proj.weight, r_v))
    ]
    return sum(back), concat @ mha.out_proj.weight.T, absorbed


def _reference(model, x, target, conserve=False):
    """Explicit AttnLRP through one pre-norm layer and the head, for one item ``x`` (L, E)."""
    layer = model.layers[0]
    u = layer.norm1(x)
    _, att, _ = _attention(u, layer.self_attn, torch.zeros(L, E, dtype=x.dtype))
    h = x + att
    n2 = layer.norm2(h)
    z = n2 @ layer.linear1.weight.T
    f = torch.nn.functional.gelu(z)
    ffn = f @ layer.linear2.weight.T
    y = h + ffn
    w = model.head.weight[target : target + 1]
    r_y = torch.zeros_like(y)
    r_y[0] = _linear(y[0], w, (y[0] @ w.T))  # R_out = the logit itself
    r_h, r_ffn = _share(h, ffn, r_y)
    r_z = _linear(f, layer.linear2.weight, r_ffn)  # identity rule: R_f passes to z unchanged
    r_h = r_h + _layer_norm(h, layer.norm2, _linear(n2, layer.linear1.weight, r_z))
    r_x, r_att = _share(x, att, r_h)
    r_u, _, absorbed = _attention(u, layer.self_attn, r_att)
    r = (r_x + _layer_norm(x, layer.norm1, r_u)).sum(-1)
    return r + absorbed if conserve else r  # conserve: a row's absorbed share goes to its query token


@pytest.mark.parametrize("conserve", [False, True])
def test_attnlrp_matches_the_rules_written_out(conserve):
    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(3, L, E, dtype=torch.float64)
    target = torch.tensor([1, 0, 3])
    got = lrp(model, x, target, conserve=conserve)
    assert got.relevance.shape == (3, L) and got.relevance.dtype == torch.float64
    for b in range(3):
        want = _reference(model, x[b], int(target[b]), conserve)
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
    """A ViT with class-token and with mean pooling (biases after the pooling have no token) conserves."""
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
        got = lrp(vit, torch.randn(2, 1, 16, 16, dtype=torch.float64), 0)
        assert got.relevance.shape == (2, 17)
        assert float(got.conservation.max()) < 1e-10


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
