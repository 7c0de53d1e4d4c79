"""capture for models captured many times (a served model): kernel="math" records the forward's own
probabilities, and a plan learned from an example hooks only the modules that compute attention."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

import attnkit
from attnkit.explain import capture, capture_plan


def _bert(hf_pair):
    """A 2-layer random BERT on transformers' sdpa (it calls F.scaled_dot_product_attention)."""
    cfg = BertConfig(  # initializer_range 1: peaked maps (the default 0.02 gives nearly uniform ones)
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=50,
        initializer_range=1.0,
    )
    return hf_pair(BertModel, cfg)


def _bert_inputs():
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


#: (first layer, later layers): the later layers' inputs already differ by the two kernels' rounding, which the
#: peaked maps of a random BERT amplify in float32.
TOLS = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-5)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_math_kernel_records_the_forward_s_own_probabilities(hf_pair, monkeypatch, dtype):
    from attnkit.explain import _intercept
    from attnkit.vision.vit import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=4, num_classes=3, embed_dim=16, depth=2, num_heads=2)
    bert = _bert(hf_pair)[0]  # transformers' sdpa: calls F.scaled_dot_product_attention
    for model, inputs in [(vit.eval(), {"x": torch.randn(2, 3, 16, 16)}), (bert, _bert_inputs())]:
        model.to(dtype)
        inputs = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        with torch.no_grad(), capture(model) as ref:  # the model's kernels, probabilities recomputed on the side
            want = model(**inputs)
        calls = []
        monkeypatch.setattr(_intercept, "probability_tiles", lambda *a, calls=calls, **k: calls.append(1))
        with torch.no_grad(), capture(model, kernel="math") as rec:
            got = model(**inputs)
        monkeypatch.undo()
        assert not calls  # nothing recomputed: the probabilities are those the forward computed
        assert [(m.name, m.layer, m.kind, m.shape, m.layout) for m in rec.maps] == [
            (m.name, m.layer, m.kind, m.shape, m.layout) for m in ref.maps
        ]
        for a, b in zip(rec.maps, ref.maps):
            assert a.weights.dtype == b.weights.dtype
            torch.testing.assert_close(a.weights, b.weights, atol=TOLS[dtype][a.layer > 0], rtol=0)
        out, exp = (got, want) if model is vit else (got.last_hidden_state, want.last_hidden_state)
        torch.testing.assert_close(out, exp, atol=50 * TOLS[dtype][1], rtol=0)  # the math path: equal up to rounding


def test_math_kernel_with_filters_computes_the_other_layers_with_the_model_s_kernel(monkeypatch):
    from attnkit.vision.vit import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=3, num_heads=2).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad(), capture(vit) as ref:
        vit(x)
    ran = []
    monkeypatch.setattr("attnkit.explain._intercept.math_forward", _wrap(ran))
    with torch.no_grad(), capture(vit, kernel="math", layers=[1], heads=[1], query_rows=[0]) as rec:
        vit(x)
    assert len(ran) == 1 and [m.layer for m in rec.maps] == [1]
    torch.testing.assert_close(rec.maps[0].weights, ref.maps[1].weights[:, 1:, :1], atol=2e-6, rtol=0)
    with (
        pytest.raises(ValueError, match="kernel must be one of 'model', 'math', got 'sdpa'"),
        capture(vit, kernel="sdpa"),
    ):
        pass


def _wrap(ran):
    from attnkit.backends.math import math_forward

    def counted(*args, **kwargs):
        ran.append(1)
        return math_forward(*args, **kwargs)

    return counted


@torch.no_grad()
def test_a_plan_learned_from_an_example_hooks_fewer_modules_and_records_the_same(hf_pair):
    from attnkit.vision.vit import VisionTransformer

    vit = VisionTransformer(image_size=16, patch_size=8, num_classes=3, embed_dim=16, depth=2, num_heads=2).eval()
    bert = _bert(hf_pair)[0]
    for model, inputs in [(vit, {"x": torch.randn(2, 3, 16, 16)}), (bert, _bert_inputs())]:
        full = capture_plan(model)
        learned = capture_plan(model, example=lambda model=model, inputs=inputs: model(**inputs))
        assert sum(s for _, s, _ in learned.modules) < sum(s for _, s, _ in full.modules)
        for kernel in ("model", "math"):
            with capture(model, plan=full, kernel=kernel) as ref:
                model(**inputs)
            with capture(model, plan=learned, kernel=kernel) as rec:
                model(**inputs)
            assert [(m.name, m.layer, m.kind, m.layout) for m in rec.maps] == [
                (m.name, m.layer, m.kind, m.layout) for m in ref.maps
            ]
            assert all(torch.equal(a.weights, b.weights) for a, b in zip(rec.maps, ref.maps))
    assert rec.maps[0].name == "encoder.layer.0.attention.self"
    assert [m.layout.grid for m in capture_plan_records(vit)] == [(2, 2), (2, 2)]


def capture_plan_records(vit):
    plan = capture_plan(vit, example=lambda: vit(torch.randn(1, 3, 16, 16)))
    with capture(vit, plan=plan) as rec:
        vit(torch.randn(1, 3, 16, 16))
    return rec.maps


def test_a_learned_plan_refuses_attention_from_modules_it_did_not_see():
    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = attnkit.nn.MultiHeadAttention(8, 2), attnkit.nn.MultiHeadAttention(8, 2)

        def forward(self, x, use_b=False):
            return (self.b if use_b else self.a)(x, x, x)[0]

    model, x = Branches().eval(), torch.randn(1, 5, 8)
    plan = capture_plan(model, example=lambda: model(x))
    with capture(model, plan=plan) as rec:
        model(x)
    assert [m.name for m in rec.maps] == ["a"]
    with (
        pytest.raises(RuntimeError, match="outside the modules that computed it in the example"),
        capture(model, plan=plan),
    ):
        model(x, use_b=True)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="example computed no attention"):
        capture_plan(model, example=lambda: None)
    with pytest.raises(TypeError, match="callable"):
        capture_plan(model, example=3)


def test_a_plan_learned_on_torch_s_fast_path_serves_both_paths():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():  # eligible for torch's native fast path
        plan = capture_plan(layer, example=lambda: layer(x))
    for grad in (False, True):  # with autograd on, nn.MultiheadAttention.forward runs
        with torch.set_grad_enabled(grad), capture(layer) as ref:
            layer(x)
        with torch.set_grad_enabled(grad), capture(layer, plan=plan) as rec:
            layer(x)
        assert [m.name for m in rec.maps] == [m.name for m in ref.maps] == ["self_attn"]
        torch.testing.assert_close(rec.maps[0].weights, ref.maps[0].weights, atol=0, rtol=0)
