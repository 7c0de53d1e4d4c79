"""AttnLRP written out as explicit relevance propagation (float64), the reference of the lrp tests: one bias-free
pre-norm attnkit encoder layer (GELU FFN) and a linear head on token 0."""

import math

import torch
from torch import nn

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


def reference(model, x, target, conserve=False, *, features=False):
    """Explicit AttnLRP through one pre-norm layer and the head, for one item ``x`` (L, E): ``(L,)`` token
    relevance, or with ``features`` ``(L, E)`` per feature and ``(L,)`` the softmax's absorbed share per token."""
    layer = model.layers[0]
    u = layer.norm1(x)
    _, att, _ = _attention(u, layer.self_attn, torch.zeros_like(x))
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
    r = r_x + _layer_norm(x, layer.norm1, r_u)
    if features:
        return r, absorbed
    return r.sum(-1) + absorbed if conserve else r.sum(-1)  # conserve: a row's absorbed share goes to its query token
