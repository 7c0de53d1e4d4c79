"""Pixel relevance of lrp through convolutional patch stems, against the rules written out as matrices (float64)."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from attnkit.explain.lrp import lrp
from attnkit.vision.conv_patch_embed import ConvPatchEmbed
from lrp_reference import E, Encoder, reference

SIZE, PATCH, CHANS = 16, 4, 2
GRID = SIZE // PATCH
#: dtype -> (rtol, atol) of the pixel relevance against the float64 reference (float32: one rounding per layer of
#: a 16x16 image, relative to relevance of order 1)
TOLERANCES = {torch.float64: (1e-7, 1e-9), torch.float32: (2e-3, 2e-4)}


class ConvViT(nn.Module):
    """ConvPatchEmbed (two stride-2 4x4 convolutions with BatchNorm and ReLU, a 1x1 projection with bias), a class
    token and a position embedding, then the reference's encoder layer and head."""

    def __init__(self):
        super().__init__()
        self.patch_embed = ConvPatchEmbed(patch_size=PATCH, in_chans=CHANS, embed_dim=E)
        self.cls_token = nn.Parameter(torch.randn(1, 1, E))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + GRID * GRID, E))
        self.encoder = Encoder()

    def forward(self, image):
        tokens = self.patch_embed(image)
        x = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], 1) + self.pos_embed
        return self.encoder(x)


def _model(seed=0):
    torch.manual_seed(seed)
    model = ConvViT().double().eval()
    with torch.no_grad():  # BatchNorm statistics and affine parameters far from the identity, biases far from 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    return model


def _conv_matrix(conv, shape):
    """The convolution (without bias) as a dense matrix ``(out_numel, in_numel)``: its response to each basis image."""
    n = shape[0] * shape[1] * shape[2]
    basis = torch.eye(n, dtype=torch.float64).reshape(n, *shape)
    out = F.conv2d(basis, conv.weight.detach(), None, conv.stride, conv.padding)
    return out.reshape(n, -1).T, out.shape[1:]


def _spread(amount, weight):
    """Cell (i, j) of an (h, w) map covers the pixels with floor(y h / Hi) = i, floor(x w / Wi) = j; its amount goes
    to them in proportion to ``weight`` (evenly when that is 0)."""
    out = torch.zeros_like(weight)
    (h, w), (hi, wi) = amount.shape, weight.shape
    for i in range(h):
        for j in range(w):
            ys = [y for y in range(hi) if y * h // hi == i]
            xs = [x for x in range(wi) if x * w // wi == j]
            cell = weight[ys][:, xs]
            frac = cell / cell.sum() if cell.sum() > 0 else torch.full_like(cell, 1 / cell.numel())
            out[torch.tensor(ys)[:, None], torch.tensor(xs)[None, :]] += amount[i, j] * frac
    return out


def _pixel_reference(model, image, target, pixel_rule, conserve):
    """LRP of one image ``(C, Hi, Wi)``: the reference's AttnLRP down to the first layer's input, the sum rule at
    ``x0 = stem(image) + pos``, then the stem layer by layer as matrices: LRP-0 for the later convolutions and the
    BatchNorms (their biases / shifts absorb), the identity rule for ReLU, ``pixel_rule`` for the first convolution
    (Montavon et al. 2019, Sec. 10.3.2); with ``conserve`` the absorbed amounts are spread as lrp documents."""
    layers = list(model.patch_embed.stem)
    acts, shape = [image.flatten()], image.shape
    record = []  # (layer, input, output, shape_in, shape_out, matrix or None)
    for layer in layers:
        x = acts[-1]
        if isinstance(layer, nn.Conv2d):
            m, shape_out = _conv_matrix(layer, shape)
            b = layer.bias.detach().repeat_interleave(shape_out[1] * shape_out[2]) if layer.bias is not None else 0
            y = m @ x + b
        elif isinstance(layer, nn.BatchNorm2d):
            a = layer.weight / (layer.running_var + layer.eps).sqrt()
            c = layer.bias - layer.running_mean * a
            m, shape_out = None, shape
            n = shape[1] * shape[2]
            y = a.detach().repeat_interleave(n) * x + c.detach().repeat_interleave(n)
        else:
            m, shape_out, y = None, shape, x.clamp_min(0)
        record.append((layer, x, y, shape, shape_out, m))
        acts.append(y)
        shape = shape_out
    out = acts[-1].reshape(E, GRID * GRID).T  # (Gh·Gw, E) patch tokens
    x0 = torch.cat([model.cls_token[0], out], 0) + model.pos_embed[0]
    r0, softmax_share = reference(model.encoder, x0.detach(), target, features=True)
    r = (out / x0[1:] * r0[1:]).T.flatten()  # the sum rule: the stem output's share of each patch feature
    r_patches = r.reshape(E, -1).sum(0)
    absorbed = []  # (h', w') maps
    for layer, x, y, shape_in, shape_out, m in reversed(record):
        per_map = shape_out[1:]
        if isinstance(layer, nn.Conv2d) and layer is layers[0] and pixel_rule != "lrp-0":
            if pixel_rule == "zb":
                low = x.reshape(shape_in).amin((1, 2), keepdim=True).expand(shape_in).flatten()
                high = x.reshape(shape_in).amax((1, 2), keepdim=True).expand(shape_in).flatten()
                z = m * x[None] - m.clamp(min=0) * low[None] - m.clamp(max=0) * high[None]  # (out, in)
            else:
                z = m.square()
            r = (z / z.sum(1, keepdim=True) * r[:, None]).sum(0)
        elif isinstance(layer, nn.Conv2d):
            bias = y - m @ x
            ratio = torch.where(y == 0, 0.0, r / y)  # an output that is exactly 0 holds no relevance
            absorbed.append((bias * ratio).reshape(shape_out).sum(0))
            r = x * (m.T @ ratio)
        elif isinstance(layer, nn.BatchNorm2d):
            n = per_map[0] * per_map[1]
            a = (layer.weight / (layer.running_var + layer.eps).sqrt()).detach().repeat_interleave(n)
            absorbed.append(((y - a * x) / y * r).reshape(shape_out).sum(0))
            r = a * x / y * r
        # ReLU: the identity rule, r unchanged
    flow = r.reshape(shape_in).sum(0)
    if not conserve:
        return flow
    tokens = r0.sum(-1) + softmax_share
    absorbed.append((tokens[1:] - r_patches).reshape(GRID, GRID))
    absorbed.append(tokens[:1].reshape(1, 1))
    return flow + sum(_spread(a, flow.abs()) for a in absorbed)


@pytest.mark.parametrize("conserve", [True, False])
@pytest.mark.parametrize("pixel_rule", ["zb", "w2", "lrp-0"])
def test_pixels_match_the_rules_written_out(pixel_rule, conserve):
    model = _model()
    image = torch.rand(2, CHANS, SIZE, SIZE, dtype=torch.float64)
    image[0, :, :5] = 0.0  # a black band: pixels on the lower bound
    target = torch.tensor([1, 3])
    got = lrp(model, image, target, pixel_rule=pixel_rule, conserve=conserve)
    assert got.relevance.shape == (2, SIZE, SIZE) and got.relevance.dtype == torch.float64
    assert got.token_relevance.shape == (2, 1 + GRID * GRID)
    rtol, atol = TOLERANCES[torch.float64]
    for b in range(2):
        want = _pixel_reference(model, image[b], int(target[b]), pixel_rule, conserve)
        torch.testing.assert_close(got.relevance[b], want, rtol=rtol, atol=atol)
    if conserve:
        assert float(got.conservation.max()) < 1e-10
    else:  # BatchNorm shifts, the projection's bias, position embeddings and the class token keep relevance
        assert float(got.conservation.min()) > 1e-3


def test_float32_against_the_float64_reference():
    model = _model(1)
    image = torch.rand(2, CHANS, SIZE, SIZE, dtype=torch.float64)
    got = lrp(model.float(), image.float(), 2)
    rtol, atol = TOLERANCES[torch.float32]
    scale = got.relevance.abs().max()
    for b in range(2):
        want = _pixel_reference(model.double(), image[b], 2, "zb", True)
        torch.testing.assert_close(got.relevance[b] / scale, want / scale, rtol=rtol, atol=atol)
    assert float(got.conservation.max()) < 1e-5


def test_the_pixel_rule_and_the_bounds_matter():
    """z^B gives relevance to pixels on the lower bound (LRP-0 = gradient x input cannot); wider bounds change it."""
    model = _model(2)
    image = torch.rand(1, CHANS, SIZE, SIZE, dtype=torch.float64)
    image[:, :, 6:10, 6:10] = 0.0
    zb, plain = lrp(model, image, 0, conserve=False), lrp(model, image, 0, pixel_rule="lrp-0", conserve=False)
    assert float(plain.relevance[0, 6:10, 6:10].abs().max()) == 0.0
    scale = float(zb.relevance.abs().max())
    assert float(zb.relevance[0, 6:10, 6:10].abs().max()) > 0.05 * scale
    wide = lrp(model, image, 0, conserve=False, bounds=(-1.0, 2.0))
    assert float((wide.relevance - zb.relevance).abs().max()) > 0.05 * scale
    per_channel = torch.tensor([0.0, 0.0]).reshape(CHANS, 1, 1), torch.tensor([1.0, 1.5]).reshape(CHANS, 1, 1)
    assert float(lrp(model, image, 0, bounds=per_channel).conservation.max()) < 1e-10


def test_hf_vit_gives_pixels(tmp_path):
    """A tiny random transformers ViT on attnkit attention, and attnkit's VisionTransformer loaded from its
    checkpoint: the same pixel relevance through two implementations of the same model."""
    from transformers import ViTConfig, ViTForImageClassification

    from attnkit.integrations.transformers import register
    from attnkit.vision import VisionTransformer

    register()
    torch.manual_seed(3)
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        image_size=16,
        patch_size=4,
        num_labels=4,
    )
    model = ViTForImageClassification(cfg).double().eval()
    with torch.no_grad():  # transformers initialises biases and the class token to 0: make them absorb something
        for name, p in model.named_parameters():
            if name.endswith("bias") or "cls_token" in name or "position" in name:
                p.normal_(0.0, 0.5)
    model.set_attn_implementation("attnkit")
    pixels = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    got = lrp(model, {"pixel_values": pixels}, 1, bounds=(-1.0, 1.0))
    assert got.relevance.shape == (2, 16, 16) and got.token_relevance.shape == (2, 17)
    assert float(got.conservation.max()) < 1e-10
    assert float(lrp(model, pixels, 1, conserve=False).conservation.min()) > 1e-3
    tokens = lrp(model, {"pixel_values": pixels}, 1, pixels=False)
    assert tokens.relevance.shape == (2, 17) and float(tokens.conservation.max()) < 1e-10
    model.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path, dtype=torch.float64)
    for conserve in (True, False):
        a = lrp(model, {"pixel_values": pixels}, 1, rule="cp-lrp", conserve=conserve)
        b = lrp(ours, pixels, 1, rule="cp-lrp", conserve=conserve)
        torch.testing.assert_close(a.logit, b.logit, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(a.relevance, b.relevance, rtol=1e-6, atol=1e-9)


def test_bad_inputs():
    model = _model()
    image = torch.rand(1, CHANS, SIZE, SIZE, dtype=torch.float64)
    with pytest.raises(ValueError, match="pixel_rule must be one of 'zb', 'w2', 'lrp-0', got 'flat'"):
        lrp(model, image, 0, pixel_rule="flat")
    with pytest.raises(TypeError, match="pixels must be None, True or False"):
        lrp(model, image, 0, pixels="yes")
    with pytest.raises(ValueError, match=r"outside bounds \(0.2, 1.0\)"):
        lrp(model, image, 0, bounds=(0.2, 1.0))
    with pytest.raises(TypeError, match="bounds to be a"):
        lrp(model, image, 0, bounds=0.5)
    with pytest.raises(ValueError, match="broadcastable"):
        lrp(model, image, 0, bounds=(torch.zeros(5), 1.0))
    with pytest.raises(ValueError, match="exactly one"):
        lrp(model.encoder, torch.randn(1, 3, E, dtype=torch.float64), 0, pixels=True)
    model.patch_embed.stem[1].train()
    with pytest.raises(ValueError, match="BatchNorm2d in training mode"):
        lrp(model, image, 0, pixels=True)
    model.eval()
    model.patch_embed.stem.insert(1, nn.MaxPool2d(1))
    with pytest.raises(ValueError, match="without a pixel rule: MaxPool2d"):
        lrp(model, image, 0, pixels=True)
    assert lrp(model, image, 0).relevance.shape == (1, 1 + GRID * GRID)  # auto: the token relevance
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_hf_clip_vision_with_its_pre_norm_gives_pixels():
    """CLIP's vision tower: a bias-free patch convolution, position ids through an nn.Embedding and a LayerNorm
    over the tokens before the first layer."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from attnkit.integrations.transformers import register

    register()
    torch.manual_seed(4)
    cfg = CLIPVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4
    )
    model = CLIPVisionModel(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "embedding" in name:
                p.normal_(0.0, 0.5)
    model.set_attn_implementation("attnkit")
    pixels = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    got = lrp(model, {"pixel_values": pixels}, lambda out: out.pooler_output[:, 0], pixels=True)
    assert got.relevance.shape == (2, 16, 16) and float(got.conservation.max()) < 1e-10
    published = lrp(model, {"pixel_values": pixels}, lambda out: out.pooler_output[:, 0], conserve=False)
    assert float(published.conservation.min()) > 1e-3
