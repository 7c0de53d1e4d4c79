"""Context mixing against the papers' formulas, written out head by head and token by token."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnkit.explain.context_mixing import attention_norms, mixing_vectors, value_zeroing
from attnkit.models.bert import BertConfig, BertModel
from attnkit.nn import MultiHeadAttention, TransformerEncoderLayer


@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_mixing_vectors_sum_to_the_attention_output(num_kv_heads):
    """Kobayashi et al. 2020, Eq. 5: output_i = sum_h sum_j alpha_hij f_h(x_j) + b_O."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, num_kv_heads=num_kv_heads, dtype=torch.float64).eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, weights = mha(x, need_weights=True)
    vec = mixing_vectors(weights, x, mha)
    assert vec.shape == (2, 4, 5, 5, 16)
    torch.testing.assert_close(vec.sum((1, 3)) + mha.out_proj.bias, out)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(TransformerEncoderLayer(12, 3, ffn_dim=20, dtype=torch.float64) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_attention_norms_match_the_formula_head_by_head():
    torch.manual_seed(1)
    model = Encoder().eval()
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    got = attention_norms(model, x)
    assert got.names == ["layers.0.self_attn", "layers.1.self_attn"] and got.maps.shape == (2, 2, 6, 6)
    h = x
    for li, layer in enumerate(model.layers):
        mha = layer.self_attn
        _, alpha = mha(h, need_weights=True)  # the module's own probabilities, not capture's
        d = mha.head_dim
        layer_vec = torch.zeros(2, 6, 6, 12, dtype=torch.float64)
        for head in range(3):
            rows = slice(head * d, (head + 1) * d)
            v = h @ mha.v_proj.weight[rows].T + mha.v_proj.bias[rows]  # (B, L, D)
            f = v @ mha.out_proj.weight[:, rows].T  # (B, L, E)
            for i in range(6):
                for j in range(6):
                    want = alpha[:, head, i, j, None] * f[:, j]
                    layer_vec[:, i, j] += want
                    torch.testing.assert_close(got.heads[li, :, head, i, j], want.norm(dim=-1))
        torch.testing.assert_close(got.maps[li], layer_vec.norm(dim=-1))
        h = layer(h)
    rolled = got.rollout()
    torch.testing.assert_close(rolled.sum(-1), torch.ones(2, 6, dtype=torch.float64))


def _bert():
    torch.manual_seed(2)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=24)
    return BertModel(cfg, dtype=torch.float64).eval()


def test_value_zeroing_matches_one_run_per_token_on_bert():
    """Mohebbi et al. 2023, Eq. 2-3, one layer run per zeroed token (the implementation batches them)."""
    model = _bert()
    ids = torch.tensor([[2, 7, 9, 11, 0], [3, 4, 5, 6, 8]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = value_zeroing(model, {"input_ids": ids, "attention_mask": mask}, chunk_size=2)
    assert got.names == ["layers.0", "layers.1"] and got.maps.shape == (2, 2, 5, 5) and got.heads is None
    keep = mask.bool()[:, None, None, :]
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    h = model.embeddings(ids, torch.zeros_like(ids))
    for li, layer in enumerate(model.layers):
        out = layer(h, attn_mask=additive)
        for j in range(5):

            def zero(_m, _a, v, j=j):
                v = v.clone()
                v[:, j] = 0
                return v

            handle = layer.self_attn.v_proj.register_forward_hook(zero)
            zeroed = layer(h, attn_mask=additive)
            handle.remove()
            want = 1 - F.cosine_similarity(zeroed, out, dim=-1)  # (B, L): C_ij over i for this j
            torch.testing.assert_close(got.maps[li, :, :, j], want.clamp_min(0))
        h = out
    assert float(got.maps[:, 0, :, 4].abs().max()) < 1e-12  # a padded key's value is never read (cosine rounding)
    torch.testing.assert_close(got.rollout().sum(-1), torch.ones(2, 5, dtype=torch.float64))


def test_bert_attention_norms_and_errors():
    model = _bert()
    ids = torch.tensor([[2, 7, 9, 0]])
    got = attention_norms(model, {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0]])})
    assert got.maps.shape == (2, 1, 4, 4) and float(got.maps[..., 3].abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"no attnkit\.nn\.MultiHeadAttention"):
        attention_norms(nn.Linear(3, 3), torch.randn(1, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        value_zeroing(model, ids, chunk_size=0)
    with pytest.raises(ValueError, match=r"no attnkit\.nn\.TransformerEncoderLayer"):
        value_zeroing(nn.Linear(3, 3), torch.randn(1, 3))
