"""VisionTransformer and PatchEmbed against Dosovitskiy et al. 2021 Eq. 1-4 written out in float64."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnkit.vision import PatchEmbed, VisionTransformer, interpolate_pos_embed
from vision.vision_helpers import TOL, captured, rand, randomize_


def layer_norm(t, norm):
    mu = t.mean(-1, keepdim=True)
    return (t - mu) / torch.sqrt(((t - mu) ** 2).mean(-1, keepdim=True) + norm.eps) * norm.weight + norm.bias


def linear(t, layer):
    return t @ layer.weight.T + layer.bias


def patches_reference(pe, x):
    """Eq. 1: flatten each P x P patch (channel, row, column order) and multiply by E."""
    b, c, h, w = x.shape
    ph, pw = pe.patch_size
    gh, gw = h // ph, w // pw
    x = x[:, :, : gh * ph, : gw * pw].reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, gh * gw, c * ph * pw) @ pe.proj.weight.reshape(pe.embed_dim, -1).T + pe.proj.bias


def vit_reference(m, x, pos):
    """Eq. 1-4 with pre-norm MSA and MLP (exact GELU) residual blocks and a final LayerNorm."""
    z = patches_reference(m.patch_embed, x)
    if m.cls_token is not None:
        z = torch.cat([m.cls_token.expand(z.shape[0], -1, -1), z], 1)
    z = z + pos
    for blk in m.blocks:
        a = blk.self_attn
        nh = a.num_heads
        d = z.shape[-1] // nh
        y = layer_norm(z, blk.norm1)
        q, k, v = (linear(y, p).unflatten(-1, (nh, d)) for p in (a.q_proj, a.k_proj, a.v_proj))
        att = torch.softmax(torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d), -1)
        z = z + linear(torch.einsum("bhij,bjhd->bihd", att, v).flatten(-2), a.out_proj)
        hid = linear(layer_norm(z, blk.norm2), blk.linear1)
        z = z + linear(0.5 * hid * (1 + torch.erf(hid / math.sqrt(2))), blk.linear2)
    return layer_norm(z, m.norm)


@settings(max_examples=10, deadline=None)
@given(
    patch=st.integers(2, 5),
    gh=st.integers(1, 4),
    gw=st.integers(1, 4),
    extra=st.integers(0, 1),
    class_token=st.booleans(),
    heads=st.sampled_from([1, 2]),
)
def test_features_and_gradients_match_eq1_to_eq4(patch, gh, gw, extra, class_token, heads):
    m = VisionTransformer(
        image_size=(gh * patch, gw * patch),
        patch_size=patch,
        in_chans=2,
        num_classes=3,
        embed_dim=4 * heads,
        depth=2,
        num_heads=heads,
        class_token=class_token,
        pool="token" if class_token else "mean",
        dtype=torch.float64,
    )
    randomize_(m, std=0.3)
    x = rand(2, 2, gh * patch + extra, gw * patch + extra).requires_grad_(True)
    feats = m.forward_features(x)
    ref = vit_reference(m, x, m.pos_embed)
    torch.testing.assert_close(feats, ref, **TOL[torch.float64])
    pooled = ref[:, 0] if class_token else ref[:, m.num_prefix_tokens :].mean(1)
    torch.testing.assert_close(m(x), linear(pooled, m.head), **TOL[torch.float64])
    up = rand(*feats.shape, seed=9)
    params = list(m.parameters())
    got = torch.autograd.grad(feats, [x, *params], up, allow_unused=True)
    want = torch.autograd.grad(ref, [x, *params], up, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, w, **TOL[torch.float64])


def test_interpolated_positions_used_for_other_sizes():
    m = randomize_(
        VisionTransformer(image_size=16, patch_size=4, embed_dim=8, depth=1, num_heads=2, dtype=torch.float64)
    )
    x = rand(1, 3, 24, 20)
    patches = torch.nn.functional.interpolate(
        m.pos_embed[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(6, 5), mode="bicubic"
    )
    pos = torch.cat([m.pos_embed[:, :1], patches.permute(0, 2, 3, 1).reshape(1, 30, 8)], 1)
    torch.testing.assert_close(m.forward_features(x), vit_reference(m, x, pos), **TOL[torch.float64])
    assert m.token_layout == {"grid": (6, 5), "num_prefix_tokens": 1, "patch_size": (4, 4)}


def test_interpolate_pos_embed_properties():
    pos = rand(1, 12, 5)
    assert interpolate_pos_embed(pos, (3, 4), (3, 4)) is pos
    const = torch.ones(1, 12, 5) * 0.7
    torch.testing.assert_close(interpolate_pos_embed(const, (3, 4), (7, 2)), torch.full((1, 14, 5), 0.7))


def test_one_attention_event_per_layer_and_identical_outputs():
    m = VisionTransformer(image_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2, num_classes=4).eval()
    x = torch.randn(2, 3, 16, 16)
    plain = m(x)
    with captured() as events:
        observed = m(x)
    assert torch.equal(plain, observed)
    assert [e.spec.query.shape for e in events] == [(2, 2, 5, 8)] * 3


def test_channels_last_and_float32_backends():
    m = VisionTransformer(image_size=16, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(m(x.to(memory_format=torch.channels_last)), m(x), **TOL[torch.float32])
    assert m(x).shape == (2, 16)


def test_errors():
    with pytest.raises(ValueError, match="pool='token' needs class_token"):
        VisionTransformer(class_token=False)
    with pytest.raises(ValueError, match="pool must be one of"):
        VisionTransformer(pool="max")
    with pytest.raises(ValueError, match="smaller than one patch"):
        VisionTransformer(image_size=8, patch_size=16)
    with pytest.raises(TypeError, match="patch_size"):
        PatchEmbed(patch_size=(2, 2, 2))
    pe = PatchEmbed(patch_size=4, in_chans=1, embed_dim=8)
    with pytest.raises(ValueError, match="smaller than one patch"):
        pe(torch.randn(1, 1, 3, 8))
    with pytest.raises(ValueError, match="1 channels"):
        pe(torch.randn(1, 3, 8, 8))
