"""create_attention: every name builds the documented block; unknown names and duplicates raise."""

import pytest
import torch
from torch import nn

from attnkit.vision import CBAM, ECA, MHSA2d, NonLocal2d, SqueezeExcite
from attnkit.vision.registry import available_attention, create_attention, register_attention


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("se", SqueezeExcite),
        ("eca", ECA),
        ("cbam", CBAM),
        ("nonlocal", NonLocal2d),
        ("mhsa", MHSA2d),
        (None, nn.Identity),
    ],
)
def test_names_build_their_block_and_keep_shape(name, cls):
    block = create_attention(name, 32)
    assert type(block) is cls
    x = torch.randn(2, 32, 5, 6)
    assert block(x).shape == x.shape


def test_kwargs_and_factory_options_pass_through():
    se = create_attention("se", 64, reduction=8, dtype=torch.float64)
    assert se.reduced_channels == 8 and se.fc1.weight.dtype == torch.float64


def test_unknown_name_lists_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown attention 'sk'; valid names: 'cbam', 'eca', 'mhsa', 'nonlocal', 'se'"
    ):
        create_attention("sk", 8)


def test_register_twice_raises_and_new_names_work():
    with pytest.raises(ValueError, match="already registered"):
        register_attention("se")
    assert {"se", "eca", "cbam", "nonlocal", "mhsa"} <= set(available_attention())
