"""CBAM against Woo et al. 2018 Eq. 1-3 written out in float64 (convolution as an explicit sum over offsets)."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import CBAM, ChannelAttention, SpatialAttention
from vision.vision_helpers import TOL, assert_same_grads, captured, rand, randomize_


def sigmoid(t):
    return 1 / (1 + torch.exp(-t))


def channel_reference(module, x):
    """Eq. 2: M_c = sigmoid(W1 relu(W0 avg) + W1 relu(W0 max)), biases only if the module has them."""
    w0, w1 = module.fc1.weight[:, :, 0, 0], module.fc2.weight[:, :, 0, 0]
    b0 = module.fc1.bias if module.fc1.bias is not None else 0
    b1 = module.fc2.bias if module.fc2.bias is not None else 0
    avg = x.sum((2, 3)) / (x.shape[2] * x.shape[3])
    mx = x.flatten(2).max(-1).values

    def mlp(d):
        return torch.relu(d @ w0.T + b0) @ w1.T + b1

    m = sigmoid(mlp(avg) + mlp(mx))
    return x * m[:, :, None, None], m


def spatial_reference(module, x, pool_order="avg_max"):
    """Eq. 3: M_s = sigmoid(conv_kxk([avg_c; max_c])), zero padding k // 2, optional eval-mode BatchNorm."""
    conv, bn = module.conv.conv, module.conv.bn
    avg = x.sum(1) / x.shape[1]  # (B, Hi, Wi)
    mx = x.max(1).values
    maps = [avg, mx] if pool_order == "avg_max" else [mx, avg]
    k = conv.weight.shape[-1]
    p = k // 2
    b, h, w = avg.shape
    logits = torch.zeros(b, h, w, dtype=x.dtype)
    for c, plane in enumerate(maps):
        padded = torch.zeros(b, h + 2 * p, w + 2 * p, dtype=x.dtype)
        padded[:, p : p + h, p : p + w] = plane
        for dy in range(k):
            for dx in range(k):
                logits = logits + conv.weight[0, c, dy, dx] * padded[:, dy : dy + h, dx : dx + w]
    if conv.bias is not None:
        logits = logits + conv.bias[0]
    if isinstance(bn, torch.nn.BatchNorm2d):
        logits = (logits - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps) * bn.weight[0] + bn.bias[0]
    m = sigmoid(logits)[:, None]
    return x * m, m


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(2, 24),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    r=st.sampled_from([1, 2, 4]),
    mlp_bias=st.booleans(),
)
def test_channel_attention_matches_eq2(b, c, h, w, r, mlp_bias):
    ca = randomize_(ChannelAttention(c, reduction=r, mlp_bias=mlp_bias, dtype=torch.float64))
    assert_same_grads(ca, lambda t: channel_reference(ca, t)[0], rand(b, c, h, w))


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 2),
    c=st.integers(1, 6),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    k=st.sampled_from([1, 3, 7]),
    order=st.sampled_from(["avg_max", "max_avg"]),
    norm=st.booleans(),
)
def test_spatial_attention_matches_eq3(b, c, h, w, k, order, norm):
    sa = randomize_(SpatialAttention(kernel_size=k, pool_order=order, norm=norm, dtype=torch.float64)).eval()
    assert_same_grads(sa, lambda t: spatial_reference(sa, t, order)[0], rand(b, c, h, w))


def test_cbam_is_channel_then_spatial_eq1():
    cbam = randomize_(CBAM(16, reduction=4, dtype=torch.float64))
    x = rand(2, 16, 6, 7)

    def ref(t):
        return spatial_reference(cbam.spatial, channel_reference(cbam.channel, t)[0])[0]

    assert_same_grads(cbam, ref, x)


def test_float32_and_channels_last():
    cbam = randomize_(CBAM(32, reduction=8)).eval()
    ref = copy.deepcopy(cbam).double()
    x = rand(2, 32, 9, 8, dtype=torch.float32)
    want = spatial_reference(ref.spatial, channel_reference(ref.channel, x.double())[0])[0]
    torch.testing.assert_close(cbam(x).double(), want, **TOL[torch.float32])
    torch.testing.assert_close(cbam(x.to(memory_format=torch.channels_last)), cbam(x), **TOL[torch.float32])


def test_pool_order_permutes_conv_input_channels():
    a = randomize_(SpatialAttention(pool_order="avg_max", dtype=torch.float64))
    b = SpatialAttention(pool_order="max_avg", dtype=torch.float64)
    with torch.no_grad():
        b.conv.conv.weight.copy_(a.conv.conv.weight.flip(1))
        b.conv.conv.bias.copy_(a.conv.conv.bias)
    x = rand(2, 5, 6, 6)
    torch.testing.assert_close(a(x), b(x), **TOL[torch.float64])


def test_state_dict_keys_timm_layout():
    sd = CBAM(64, spatial_norm=True).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")} == {
        "channel.fc1.weight": (4, 64, 1, 1),
        "channel.fc2.weight": (64, 4, 1, 1),
        "spatial.conv.conv.weight": (1, 2, 7, 7),
        "spatial.conv.bn.weight": (1,),
        "spatial.conv.bn.bias": (1,),
        "spatial.conv.bn.running_mean": (1,),
        "spatial.conv.bn.running_var": (1,),
    }
    assert "channel.fc1.bias" in CBAM(64, mlp_bias=True).state_dict()


def test_reports_both_maps_without_changing_output():
    cbam = randomize_(CBAM(8, reduction=2, dtype=torch.float64))
    x = rand(3, 8, 5, 4)
    plain = cbam(x)
    with captured() as events:
        observed = cbam(x)
    assert torch.equal(plain, observed)
    assert [e.kind for e in events] == ["channel", "spatial"]
    assert events[0].weights.shape == (3, 8)
    assert events[1].weights.shape == (3, 1, 5, 4)
    x1 = channel_reference(cbam.channel, x)[0]
    torch.testing.assert_close(events[1].weights, spatial_reference(cbam.spatial, x1)[1])


def test_errors():
    with pytest.raises(ValueError, match=r"reduction \(16\) is larger than channels \(4\)"):
        CBAM(4)
    with pytest.raises(ValueError, match="odd kernel_size"):
        SpatialAttention(kernel_size=6)
    with pytest.raises(ValueError, match="pool_order"):
        SpatialAttention(pool_order="mean_max")
    with pytest.raises(ValueError, match="rank 4"):
        SpatialAttention()(torch.randn(3, 4))
    with pytest.raises(ValueError, match="16 channels"):
        CBAM(16)(torch.randn(1, 8, 3, 3))
