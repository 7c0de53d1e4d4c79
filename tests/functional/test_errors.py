"""Bad input gets a clear error naming the argument, what it got and what was expected."""

import pytest
import torch

import attnkit

q = torch.randn(2, 4, 5, 8)
k = torch.randn(2, 4, 7, 8)
v = torch.randn(2, 4, 7, 8)


@pytest.mark.parametrize(
    "args,kwargs,exc,pattern",
    [
        ((q[0, 0], k, v), {}, ValueError, r"query of rank >= 3.*\(5, 8\)"),
        ((q, k[0], v), {}, ValueError, "same rank"),
        ((q, k, v[..., :5, :]), {}, ValueError, r"key \(2, 4, 7, 8\) and value \(2, 4, 5, 8\)"),
        ((q, k[..., :4], v), {}, ValueError, "head_dim D=8 differs"),
        ((q[:1], k, v), {}, ValueError, "batch dimensions differ"),
        ((q, k[:, :3], v[:, :3]), {}, ValueError, r"num_heads \(H=4\).*num_kv_heads \(Hkv=3\).*Valid Hkv: 1, 2, 4"),
        ((q, k.double(), v), {}, TypeError, "share a dtype"),
        ((q.int(), k, v), {}, TypeError, "query of dtype"),
        (("q", k, v), {}, TypeError, "query to be a torch.Tensor"),
        ((q, k, v), {"attn_mask": torch.ones(3, 7, dtype=torch.bool)}, ValueError, r"attn_mask of shape \(3, 7\)"),
        ((q, k, v), {"attn_mask": torch.ones(5, 7, dtype=torch.int64)}, TypeError, "attn_mask must be bool"),
        ((q, k, v), {"attn_bias": torch.ones(2, 3, 5, 7)}, ValueError, r"attn_bias of shape \(2, 3, 5, 7\)"),
        ((q, k, v), {"alibi_slopes": torch.ones(3)}, ValueError, r"alibi_slopes of shape \(3,\)"),
        ((q, k, v), {"window_size": -2}, ValueError, "window_size: left = -2"),
        ((q, k, v), {"window_size": (1, 2, 3)}, TypeError, "window_size"),
        ((q, k, v), {"dropout_p": 1.0}, ValueError, r"dropout_p must lie in \[0, 1\), got 1.0"),
        ((q, k, v), {"dropout_p": -0.1}, ValueError, "dropout_p"),
        ((q, k, v), {"softcap": 0.0}, ValueError, "softcap must be a positive number"),
        ((q, k, v), {"scale": float("nan")}, ValueError, "scale must be a finite number"),
        ((q, k, v), {"is_causal": 1}, TypeError, "is_causal must be a bool"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        attnkit.attention(*args, **kwargs)


def test_mask_never_broadcasts_into_a_different_meaning():
    # A (B, Lk) padding mask passed as attn_mask must not silently broadcast against (H, Lq, Lk).
    with pytest.raises(ValueError, match="attn_mask"):
        attnkit.attention(q, k, v, attn_mask=torch.ones(2, 7, dtype=torch.bool))
