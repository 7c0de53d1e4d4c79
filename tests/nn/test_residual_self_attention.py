"""ResidualSelfAttention: identity at initialisation, and equal to x + γ·torch MHA(LayerNorm(x)) in every layout."""

from __future__ import annotations

import pytest
import torch

from attnkit.nn import ResidualSelfAttention


@pytest.mark.parametrize("layout", ["BCHW", "BCL", "BLC", "LBC"])
@pytest.mark.parametrize("num_heads", [1, 4])
def test_matches_torch_multihead_attention(layout, num_heads):
    torch.manual_seed(0)
    c = 8
    block = ResidualSelfAttention(c, num_heads=num_heads, layout=layout).double()
    shape = {"BCHW": (2, c, 3, 5), "BCL": (2, c, 7), "BLC": (2, 7, c), "LBC": (7, 2, c)}[layout]
    x = torch.randn(shape, dtype=torch.float64)
    assert torch.equal(block(x), x)  # gamma starts at 0 (SAGAN)
    with torch.no_grad():
        block.gamma.fill_(0.7)
        torch.nn.init.normal_(block.norm.weight)
    reference = block.attn.to_torch().double()
    if layout == "BCHW":
        tokens = x.flatten(2).transpose(1, 2)
    elif layout == "BCL":
        tokens = x.transpose(1, 2)
    else:
        tokens = x.transpose(0, 1) if layout == "LBC" else x
    normed = block.norm(tokens)
    out, _ = reference(normed, normed, normed, need_weights=False)
    if layout == "BCHW":
        out = out.transpose(1, 2).reshape(x.shape)
    elif layout == "BCL":
        out = out.transpose(1, 2)
    elif layout == "LBC":
        out = out.transpose(0, 1)
    torch.testing.assert_close(block(x), x + 0.7 * out, rtol=1e-10, atol=1e-10)


def test_bad_input():
    with pytest.raises(ValueError, match="unknown layout 'NHWC'"):
        ResidualSelfAttention(8, layout="NHWC")
    with pytest.raises(ValueError, match=r"expected x in layout BCHW with C=8 \(dim 1\), got \(2, 4, 3, 3\)"):
        ResidualSelfAttention(8)(torch.zeros(2, 4, 3, 3))
