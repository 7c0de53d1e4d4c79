"""HybridResNet: the forward pass equals the ResNet basic-block formula written with torch.nn.functional."""

import pytest
import torch
import torch.nn.functional as F

from attnkit.vision import HybridResNet, MHSA2d, SqueezeExcite
from vision.vision_helpers import TOL, captured, rand, randomize_


def bn(t, m):
    return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)


def block_reference(blk, x):
    """relu(attn(bn2(conv2(relu(bn1(conv1 x))))) + shortcut(x)), convs with padding 1."""
    c1 = blk.conv1
    out = F.relu(bn(F.conv2d(x, c1.weight, stride=c1.stride, padding=1), blk.bn1))
    out = blk.conv2(out) if isinstance(blk.conv2, MHSA2d) else F.conv2d(out, blk.conv2.weight, padding=1)
    out = blk.attn(bn(out, blk.bn2))
    if blk.downsample is None:
        short = x
    else:
        conv, norm = blk.downsample
        short = bn(F.conv2d(x, conv.weight, stride=conv.stride), norm)
    return F.relu(out + short)


def net_reference(net, x):
    conv, norm, _ = net.stem
    h = F.relu(bn(F.conv2d(x, conv.weight, stride=conv.stride, padding=1), norm))
    for stage in net.stages:
        for blk in stage:
            h = block_reference(blk, h)
    return h, h.mean((2, 3)) @ net.fc.weight.T + net.fc.bias


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attention": None},
        {"attention": "se", "attention_kwargs": {"reduction": 4}},
        {"attention": "cbam", "attention_kwargs": {"reduction": 4}, "mhsa_last_stage": True},
        {"attention": "eca", "depths": (2, 1, 2), "widths": (8, 16, 16), "stem_stride": 2},
        {"attention": "nonlocal", "mhsa_last_stage": True, "mhsa_kwargs": {"num_heads": 2, "max_size": 8}},
    ],
)
def test_forward_matches_block_formula(kwargs):
    opts = {"widths": (8, 16, 16, 32), "depths": (1, 1, 1, 1), **kwargs}
    net = randomize_(HybridResNet(in_chans=1, num_classes=10, dtype=torch.float64, **opts), std=0.2).eval()
    x = rand(2, 1, 29, 32)
    feats, logits = net_reference(net, x)
    torch.testing.assert_close(net.forward_features(x), feats, **TOL[torch.float64])
    torch.testing.assert_close(net(x), logits, **TOL[torch.float64])


def test_digit_canvas_config_channels_last_gradients_and_events():
    net = HybridResNet(
        in_chans=1, num_classes=10, attention="se", attention_kwargs={"reduction": 8}, mhsa_last_stage=True
    )
    assert isinstance(net.stages[-1][0].conv2, MHSA2d)
    assert not any(isinstance(b.conv2, MHSA2d) for s in net.stages[:-1] for b in s)
    x = torch.randn(3, 1, 64, 64)
    assert net.forward_features(x).shape == (3, 256, 8, 8)
    net.eval()
    torch.testing.assert_close(net(x.to(memory_format=torch.channels_last)), net(x), **TOL[torch.float32])
    plain = net(x)
    with captured() as events:
        observed = net(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["channel"] * 3 + ["scaled_dot_product", "channel"]
    net.train()
    net(x).logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert sum(isinstance(m, SqueezeExcite) for m in net.modules()) == 4
    assert HybridResNet(in_chans=1, num_classes=0, widths=(8, 8), depths=(1, 1))(x).shape == (3, 8)


def test_errors():
    with pytest.raises(ValueError, match="same non-zero length"):
        HybridResNet(widths=(8, 16), depths=(1,))
    with pytest.raises(ValueError, match=r"widths\[1\] >= 1"):
        HybridResNet(widths=(8, 0), depths=(1, 1))
    with pytest.raises(ValueError, match="unknown attention 'foo'"):
        HybridResNet(attention="foo")
    with pytest.raises(ValueError, match="num_classes >= 0"):
        HybridResNet(num_classes=-1)
    with pytest.raises(ValueError, match="1 channels"):
        HybridResNet(in_chans=1, widths=(8,), depths=(1,))(torch.randn(1, 3, 8, 8))
