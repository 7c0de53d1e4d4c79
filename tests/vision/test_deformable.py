"""MultiScaleDeformableAttention against Hugging Face transformers' pure-PyTorch implementation (same weights) and
against a float64 bilinear-interpolation reference written from Eq. 2."""

import pytest
import torch

from attnkit.explain import capture
from attnkit.vision import MultiScaleDeformableAttention, multi_scale_deformable_attention
from vision.vision_helpers import TOL, rand, randomize_

transformers = pytest.importorskip("transformers")
from transformers.models.deformable_detr import modeling_deformable_detr as hf_ddetr  # noqa: E402

SHAPES = [(7, 9), (4, 5), (2, 3)]
S = sum(h * w for h, w in SHAPES)


def _bilinear(v, x, y):
    """v (D, h, w); (x, y) normalised with align_corners=False, zeros outside (float64 loop reference)."""
    d, h, w = v.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = int(torch.floor(px)), int(torch.floor(py))
    out = torch.zeros(d, dtype=v.dtype)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            if 0 <= yy < h and 0 <= xx < w:
                out += v[:, yy, xx] * (1 - abs(px - xx)) * (1 - abs(py - yy))
    return out


def test_functional_matches_loop_reference_float64():
    b, lq, h, d, p = 2, 3, 2, 5, 3
    value = rand(b, S, h, d, seed=1)
    loc = torch.rand(b, lq, h, len(SHAPES), p, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    loc = loc * 1.4 - 0.2  # some points fall outside the maps
    w = rand(b, lq, h, len(SHAPES), p, seed=3).flatten(-2).softmax(-1).view(b, lq, h, len(SHAPES), p)
    got = multi_scale_deformable_attention(value, SHAPES, loc, w)
    levels = value.split([a * c for a, c in SHAPES], 1)
    want = torch.zeros(b, lq, h, d, dtype=torch.float64)
    for bi in range(b):
        for q in range(lq):
            for hi in range(h):
                for li, (hh, ww) in enumerate(SHAPES):
                    v = levels[li][bi, :, hi].T.reshape(d, hh, ww)
                    for k in range(p):
                        x, y = loc[bi, q, hi, li, k]
                        want[bi, q, hi] += w[bi, q, hi, li, k] * _bilinear(v, x, y)
    torch.testing.assert_close(got, want.flatten(-2), **TOL[torch.float64])


@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize(("embed_dim", "num_heads", "num_points"), [(32, 4, 4), (24, 3, 1)])
def test_module_matches_transformers(ref_dim, embed_dim, num_heads, num_points):
    config = hf_ddetr.DeformableDetrConfig(d_model=embed_dim, num_feature_levels=len(SHAPES))
    theirs = hf_ddetr.DeformableDetrMultiscaleDeformableAttention(config, num_heads=num_heads, n_points=num_points)
    ours = MultiScaleDeformableAttention(embed_dim, num_heads, num_levels=len(SHAPES), num_points=num_points)
    randomize_(ours, std=0.3)
    theirs.load_state_dict(ours.state_dict())
    b, lq = 2, 11
    g = torch.Generator().manual_seed(0)
    query = torch.randn(b, lq, embed_dim, generator=g)
    value = torch.randn(b, S, embed_dim, generator=g)
    ref = torch.rand(b, lq, len(SHAPES), ref_dim, generator=g)
    pad = torch.zeros(b, S, dtype=torch.bool)
    pad[1, -7:] = True
    shapes_t = torch.tensor(SHAPES)
    want, want_w = theirs(
        query,
        attention_mask=~pad,
        encoder_hidden_states=value,
        reference_points=ref,
        spatial_shapes=shapes_t,
        spatial_shapes_list=SHAPES,
        level_start_index=torch.cat([shapes_t.new_zeros(1), shapes_t.prod(1).cumsum(0)[:-1]]),
    )
    got = ours(query, value, ref, SHAPES, key_padding_mask=pad, return_weights=True)
    torch.testing.assert_close(got.output, want, **TOL[torch.float32])
    torch.testing.assert_close(got.attention_weights, want_w, **TOL[torch.float32])
    torch.testing.assert_close(got.attention_weights.sum((-2, -1)), torch.ones(b, lq, num_heads))


def test_gradients_flow_to_offsets_and_values():
    m = MultiScaleDeformableAttention(16, 2, num_levels=3, num_points=2, dtype=torch.float64)
    randomize_(m, std=0.2)
    query = rand(1, 4, 16, seed=1).requires_grad_(True)
    value = rand(1, S, 16, seed=2).requires_grad_(True)
    ref = torch.full((1, 4, 2), 0.4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda q, v: m(q, v, ref, SHAPES), (query, value), atol=1e-6)


def test_capture_records_deformable_kind():
    m = MultiScaleDeformableAttention(16, 2, num_levels=3, num_points=2)
    query, value = torch.randn(2, 5, 16), torch.randn(2, S, 16)
    ref = torch.rand(2, 5, 2)
    with capture(m) as rec:
        out = m(query, value, ref, SHAPES, return_weights=True)
    (r,) = rec.maps
    assert r.kind == "deformable" and r.weights.shape == (2, 2, 5, 3, 2)
    torch.testing.assert_close(r.weights, out.attention_weights.transpose(1, 2))
    torch.testing.assert_close(r.layout.extra["sampling_locations"], out.sampling_locations.transpose(1, 2))
    assert r.layout.extra["spatial_shapes"] == SHAPES
    torch.testing.assert_close(m(query, value, ref, SHAPES), out.output)  # capture does not change the output


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"reference_points": torch.rand(2, 5, 3)}, "reference_points"),
        ({"spatial_shapes": [(7, 9), (4, 5)]}, "spatial_shapes"),
        ({"spatial_shapes": [(7, 9), (4, 5), (2, 2)]}, "S=89"),
        ({"key_padding_mask": torch.zeros(2, S)}, "key_padding_mask"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    m = MultiScaleDeformableAttention(16, 2, num_levels=3, num_points=2)
    args = {"reference_points": torch.rand(2, 5, 2), "spatial_shapes": SHAPES}
    args.update(kwargs)
    kpm = args.pop("key_padding_mask", None)
    with pytest.raises(ValueError, match=match):
        m(
            torch.randn(2, 5, 16),
            torch.randn(2, S, 16),
            args["reference_points"],
            args["spatial_shapes"],
            key_padding_mask=kpm,
        )


def test_bad_construction():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        MultiScaleDeformableAttention(10, 3)
