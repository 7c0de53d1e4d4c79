"""capture(): records equal transformers' eager output_attentions; outputs bit-identical; filters, errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, BertConfig, BertModel, ViTConfig, ViTModel

import attnkit
from attnkit.explain import TokenLayout, _recompute, capture, capture_plan
from attnkit.functional.spec import make_spec
from attnkit.functional.tiles import TileSetup

TOL = {"atol": 1e-6, "rtol": 0.0}


def _bert(hf_pair, layers=3):
    cfg = BertConfig(
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=120,
        max_position_embeddings=64,
    )
    return hf_pair(BertModel, cfg)


def _bert_inputs():
    ids = torch.randint(0, 120, (3, 13))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def test_bert_random_matches_eager_and_outputs_bit_identical(hf_pair):
    sdpa, eager = _bert(hf_pair)
    inputs = _bert_inputs()
    ref = sdpa(**inputs).last_hidden_state
    with capture(sdpa) as rec:
        out = sdpa(**inputs).last_hidden_state
    assert torch.equal(out, ref)
    want = eager(**inputs, output_attentions=True).attentions
    assert [m.layer for m in rec.maps] == [0, 1, 2]
    assert [m.name for m in rec.maps] == [f"encoder.layer.{i}.attention.self" for i in range(3)]
    assert all(m.kind == "self" and m.source == "sdpa" for m in rec.maps)
    for m, w in zip(rec.maps, want):
        assert m.weights.shape == (3, 4, 13, 13) == m.shape
        torch.testing.assert_close(m.weights, w, **TOL)
    assert F.scaled_dot_product_attention is torch.nn.functional.scaled_dot_product_attention
    assert not sdpa._forward_hooks and not sdpa._forward_pre_hooks


@torch.no_grad()
def test_vit_random_non_square_matches_eager_and_carries_layout(hf_pair):
    cfg = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=(32, 48),
        patch_size=8,
        num_channels=3,
    )
    sdpa, eager = hf_pair(ViTModel, cfg)
    x = torch.randn(2, 3, 32, 48)
    ref = sdpa(pixel_values=x).last_hidden_state
    with capture(sdpa) as rec:
        out = sdpa(pixel_values=x).last_hidden_state
    assert torch.equal(out, ref)
    for m, w in zip(rec.maps, eager(pixel_values=x, output_attentions=True).attentions, strict=True):
        torch.testing.assert_close(m.weights, w, **TOL)
        assert m.layout == TokenLayout(num_prefix_tokens=1, grid=(4, 6), patch_size=(8, 8))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_minilm_matches_eager(minilm_dir, dtype):
    sdpa = AutoModel.from_pretrained(minilm_dir, attn_implementation="sdpa").eval().to(dtype)
    eager = AutoModel.from_pretrained(minilm_dir, attn_implementation="eager").eval().to(dtype)
    ids = torch.randint(1000, 20000, (2, 17))
    mask = torch.ones_like(ids)
    mask[0, 12:] = 0
    ref = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    with capture(sdpa) as rec:
        out = sdpa(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)
    want = eager(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(rec.maps) == len(want) == 6
    # In float32 the fused and the eager kernels round differently, so from layer 1 on the two models see
    # inputs that differ by ~1e-7; layer 0 sees identical inputs. In float64 all layers agree.
    checked = rec.maps if dtype == torch.float64 else rec.maps[:1]
    for m, w in zip(checked, want):
        assert m.weights.dtype == dtype
        torch.testing.assert_close(m.weights, w, **TOL)


@torch.no_grad()
def test_filters_select_slices_of_the_full_maps(hf_pair, monkeypatch):
    sdpa, _ = _bert(hf_pair)
    inputs = _bert_inputs()
    with capture(sdpa) as full:
        sdpa(**inputs)
    monkeypatch.setattr(_recompute, "_TILE_ELEMENTS", 4 * 2 * 13 * 3)  # several query-row tiles per map
    with capture(sdpa, layers=[0, 2], heads=[3, 1], query_rows=[0, -1, 5]) as part:
        sdpa(**inputs)
    assert [m.layer for m in part.maps] == [0, 2] and part.num_calls == 3
    for m in part.maps:
        ref = full.maps[m.layer].weights[:, [3, 1]][:, :, [0, 12, 5]]
        torch.testing.assert_close(m.weights, ref, atol=1e-7, rtol=0)
        assert m.heads == (3, 1) and m.query_rows == (0, 12, 5)
    with capture(sdpa, head_mean=True, query_rows=slice(2, 9)) as mean:
        sdpa(**inputs)
    for m, f in zip(mean.maps, full.maps):
        torch.testing.assert_close(m.weights, f.weights[:, :, 2:9].mean(1, keepdim=True), atol=1e-7, rtol=0)


def test_mha_weights_for_every_calling_convention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True, dropout=0.3).eval()
    q, kv = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    pad = torch.zeros(2, 7, dtype=torch.bool)
    pad[0, 5:] = True
    _, want = mha(q, kv, kv, key_padding_mask=pad, average_attn_weights=False)
    for kwargs in ({}, {"need_weights": False}, {"average_attn_weights": False}):
        ref = mha(q, kv, kv, key_padding_mask=pad, **kwargs)[0]
        with capture(mha) as rec:
            out = mha(q, kv, kv, key_padding_mask=pad, **kwargs)[0]
        assert torch.equal(out, ref)
        (m,) = rec.maps
        assert m.kind == "cross" and m.name == ""
        torch.testing.assert_close(m.weights, want.detach(), atol=1e-6, rtol=0)
    with capture(mha) as rec:
        mha(q, q, q)
    assert rec.maps[0].kind == "self"


@torch.no_grad()
def test_transformer_encoder_fast_path_is_kept_and_recomputed():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True, norm_first=True)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    ref = enc(x)
    with capture(enc) as rec:
        out = enc(x)
    assert torch.equal(out, ref)
    assert [m.name for m in rec.maps] == ["layers.0.self_attn", "layers.1.self_attn"]
    # Reference: layer by layer through the slow path, weights from nn.MultiheadAttention itself.
    h = x
    for m, lay in zip(rec.maps, enc.layers):
        _, w = lay.self_attn(lay.norm1(h), lay.norm1(h), lay.norm1(h), average_attn_weights=False)
        torch.testing.assert_close(m.weights, w, atol=1e-6, rtol=0)
        h = lay(h)


def test_attnkit_attention_is_recorded():
    class Tiny(nn.Module):
        def forward(self, q, k, v):
            return attnkit.attention(q, k, v, is_causal=True, window_size=(2, 0))

    q, k, v = torch.randn(3, 2, 4, 9, 8).unbind(0)
    model = Tiny()
    with capture(model) as rec:
        model(q, k, v)
    want = attnkit.attention(q, k, v, is_causal=True, window_size=(2, 0), return_weights=True, backend="math").weights
    (m,) = rec.maps
    assert m.source == "attnkit" and m.name == ""
    torch.testing.assert_close(m.weights, want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("terms", [{}, {"is_causal": True}, {"softcap": 2.0}])
def test_unmasked_calls_take_the_plain_softmax_and_equal_the_math_backend(terms):
    class Tiny(nn.Module):
        def forward(self, q, k, v):
            return attnkit.attention(q, k, v, **terms)

    q, k, v = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64).unbind(0)
    assert TileSetup(make_spec(q, k, v, **terms)).plain == (not terms)
    model = Tiny()
    with capture(model) as rec:
        model(q, k, v)
    want = attnkit.attention(q, k, v, **terms, return_weights=True, backend="math").weights
    torch.testing.assert_close(rec.maps[0].weights, want, atol=1e-12, rtol=0)


@torch.no_grad()
def test_a_plan_made_once_serves_many_captures():
    from attnkit.vision.vit import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=2, num_heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    with capture(vit) as ref:
        vit(x)
    plan = capture_plan(vit)
    for _ in range(2):
        with capture(vit, plan=plan) as rec:
            vit(x)
        assert [(m.name, m.layer, m.layout) for m in rec.maps] == [(m.name, m.layer, m.layout) for m in ref.maps]
        assert all(torch.equal(a.weights, b.weights) for a, b in zip(rec.maps, ref.maps))
        assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())
    with pytest.raises(ValueError, match="another model"), capture(nn.Linear(2, 2), plan=plan):
        pass
    with pytest.raises(TypeError, match="capture_plan"), capture(vit, plan=object()):
        pass
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        capture_plan("model")


def test_extra_batch_dims_and_broadcast_masks_like_window_attention():
    class Windows(nn.Module):
        def forward(self, q, k, v, mask):
            return attnkit.attention(q, k, v, attn_mask=mask, window_size=(3, 1))

    q, k, v = torch.randn(3, 2, 4, 2, 9, 8).unbind(0)  # (B, nW, H, N, D)
    mask = torch.rand(4, 1, 9, 9) > 0.3  # (nW, 1, N, N), broadcast over B and H
    model = Windows()
    with capture(model) as rec:
        model(q, k, v, mask)
    want = attnkit.attention(q, k, v, attn_mask=mask, window_size=(3, 1), return_weights=True, backend="math")
    (m,) = rec.maps
    assert m.shape == (8, 2, 9, 9)
    torch.testing.assert_close(m.weights, want.weights.reshape(8, 2, 9, 9), atol=1e-6, rtol=0)


@torch.no_grad()
def test_attnkit_vision_models_publish_their_layout():
    from attnkit.vision.vit import VisionTransformer
    from attnkit.vision.window import WindowAttention

    vit = VisionTransformer(image_size=(32, 48), patch_size=8, num_classes=3, embed_dim=32, depth=2, num_heads=4)
    x = torch.randn(2, 3, 32, 48)
    ref = vit.eval()(x)
    with capture(vit) as rec:
        out = vit(x)
    assert torch.equal(out, ref)
    assert [m.layout for m in rec.maps] == [TokenLayout(num_prefix_tokens=1, grid=(4, 6), patch_size=(8, 8))] * 2
    win = WindowAttention(16, 2, window_size=4, shift_size=2)
    with capture(win) as rec:
        win(torch.randn(2, 8, 8, 16))
    (m,) = rec.maps
    assert m.shape == (8, 2, 16, 16) and m.layout.window == (4, 4) and m.layout.num_tokens == 16
    torch.testing.assert_close(m.weights.sum(-1), torch.ones(8, 2, 16))


def test_channel_gate_maps_are_recorded():
    from attnkit.vision.squeeze_excite import SqueezeExcite

    se = SqueezeExcite(16)
    x = torch.randn(2, 16, 5, 5)
    with capture(se) as rec:
        out = se(x)
    (m,) = rec.maps
    assert m.kind == "channel" and m.weights.shape == (2, 16) and m.shape == (2, 16)
    torch.testing.assert_close(out, x * m.weights[:, :, None, None])


def test_cross_attention_is_labelled():
    dec = nn.TransformerDecoderLayer(16, 4, 32, batch_first=True).eval()
    tgt, mem = torch.randn(2, 3, 16), torch.randn(2, 8, 16)
    with capture(dec) as rec:
        dec(tgt, mem)
    assert [(m.name, m.kind, m.shape[2:]) for m in rec.maps] == [
        ("self_attn", "self", (3, 3)),
        ("multihead_attn", "cross", (3, 8)),
    ]


def test_capturing_nothing_raises_with_a_hint(hf_pair):
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"), capture(nn.Linear(3, 3)) as rec:
        nn.Linear(3, 3)(torch.randn(2, 3))
    assert len(rec) == 0
    sdpa, _ = _bert(hf_pair, layers=2)
    with pytest.raises(ValueError, match=r"attention layers 0\.\.1"), capture(sdpa, layers=[5]), torch.no_grad():
        sdpa(**_bert_inputs())


def test_hooks_and_patches_removed_on_exception(hf_pair):
    sdpa, _ = _bert(hf_pair, layers=1)
    original = F.scaled_dot_product_attention
    with pytest.raises(ZeroDivisionError), capture(sdpa):
        1 / 0
    with pytest.raises(ValueError, match="heads"), capture(sdpa, heads=[7]), torch.no_grad():
        sdpa(**_bert_inputs())
    assert F.scaled_dot_product_attention is original
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in sdpa.modules())


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"layers": [-1]}, ValueError, "layers must be >= 0"),
        ({"heads": "x"}, TypeError, "heads"),
        ({"reducers": [object()]}, TypeError, "Reducer"),
        ({"differentiable": True, "head_mean": True}, ValueError, "differentiable"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match), capture(nn.Linear(2, 2), **kwargs):
        pass
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"), capture("model"):
        pass


def test_only_calls_inside_the_model_are_recorded():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(1, 4, 8)
    with capture(mha) as rec:
        F.scaled_dot_product_attention(x[:, None], x[:, None], x[:, None])  # outside the model: ignored
        mha(x, x, x)
    assert len(rec.maps) == 1
