"""Detection relevance (Chefer et al. 2021, bi-modal rules for DETR) against a direct float64 implementation of the
rules, with the attention maps and their gradients taken from an independent explicit forward of the decoder."""

import pytest
import torch

import attnkit.vision.deformable as deformable
from attnkit.explain import relevance
from attnkit.explain.detection_maps import detection_maps
from attnkit.explain.detection_relevance import (
    deformable_attention_matrix,
    query_relevance,
    relevance_maps,
)
from attnkit.vision.detection import RTDETR
from hf_detectors import hf_detectors

F64 = {"atol": 1e-10, "rtol": 1e-8}  # float64 vs float64: only summation order differs


def _model(cross_attention: str) -> RTDETR:
    torch.manual_seed(0)
    model = RTDETR(
        num_queries=6, num_layers=2, embed_dim=16, num_heads=2, ffn_dim=16, widths=(8, 8, 16), num_points=2,
        cross_attention=cross_attention,
    )  # fmt: skip
    with torch.no_grad():  # sharper maps than the near-uniform initialisation, so the check has teeth
        for p in model.decoder.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.double().eval()


def _explicit_mha(module, store):
    """``MultiHeadAttention.forward`` written out: probabilities as an explicit tensor, appended to ``store``."""

    def forward(query, key=None, value=None, **kwargs):
        key = query if key is None else key
        value = key if value is None else value
        b, lq, e = query.shape
        h = module.num_heads
        d = e // h
        q = module.q_proj(query).view(b, lq, h, d).transpose(1, 2)
        k = module.k_proj(key).view(b, -1, h, d).transpose(1, 2)
        v = module.v_proj(value).view(b, -1, h, d).transpose(1, 2)
        p = torch.softmax(q @ k.mT * d**-0.5, -1)
        store.append(("self" if key is query else "cross", p))
        return module.out_proj((p @ v).transpose(1, 2).reshape(b, lq, e)), None

    return forward


def _reference(model, image, targets, monkeypatch):
    """R^{qi}, R^{qq} rows by the paper's rules (Eq. 5-7, 10), written out in float64 over maps recorded by an
    explicit decoder forward. Deformable maps: the Jacobian of the sampling with respect to the values (the real
    grid_sample path fed one-hot values), kept on the graph of the sampling locations and weights."""
    store = []
    for layer in model.decoder.layers:
        monkeypatch.setattr(layer.self_attn, "forward", _explicit_mha(layer.self_attn, store))
        if model.cross_attention == "dense":
            monkeypatch.setattr(layer.cross_attn, "forward", _explicit_mha(layer.cross_attn, store))
    real = deformable.multi_scale_deformable_attention

    def dense_equivalent(value, shapes, loc, weights):
        b, s, h, d = value.shape
        onehot = torch.eye(s, dtype=value.dtype).view(1, s, 1, s).expand(b, s, h, s)
        a = real(onehot, shapes, loc, weights).view(b, -1, h, s).transpose(1, 2)  # (B, H, Lq, S)
        store.append(("cross", a))
        return torch.einsum("bhqs,bshd->bqhd", a, value).reshape(b, -1, h * d)

    monkeypatch.setattr(deformable, "multi_scale_deformable_attention", dense_equivalent)
    with torch.enable_grad():
        logits = model.forward_raw(image).logits[-1]
    maps = [p for _, p in store]
    rows_i, rows_q = [], []
    for q, c in targets:
        grads = torch.autograd.grad(logits[0, q, c], maps, retain_graph=True)
        nq = logits.shape[1]
        r_qq = torch.eye(nq, dtype=torch.float64)
        r_qi = None
        for (kind, a), g in zip(store, grads):
            a_bar = (g * a).clamp_min(0).mean(1)[0]  # Eq. 5
            if kind == "self":  # Eq. 6-7
                r_qq = r_qq + a_bar @ r_qq
                r_qi = None if r_qi is None else r_qi + a_bar @ r_qi
            else:  # Eq. 10 with R^{ii} = I (so its normalised form is I); Eq. 11 adds 0 (R^{iq} = 0)
                hat = r_qq - torch.eye(nq, dtype=torch.float64)
                bar = hat / hat.sum(-1, keepdim=True).where(hat.sum(-1, keepdim=True) != 0, 1.0) + torch.eye(nq)
                r_qi = (0 if r_qi is None else r_qi) + bar.T @ a_bar
        rows_i.append(r_qi[q])
        rows_q.append(r_qq[q])
    monkeypatch.undo()
    return torch.stack(rows_i), torch.stack(rows_q), logits.detach()


@pytest.mark.parametrize("cross_attention", ["dense", "deformable"])
def test_relevance_equals_the_papers_rules_in_float64(cross_attention, monkeypatch):
    model = _model(cross_attention)
    image = torch.rand(1, 1, 40, 56, dtype=torch.float64)
    targets = [(4, 7), (0, 2), (4, 1)]  # repeated query, any order
    ref_i, ref_q, ref_logits = _reference(model, image, targets, monkeypatch)
    got = query_relevance(model, lambda: model.forward_raw(image), targets)
    torch.testing.assert_close(got.output.logits[-1], ref_logits, **F64)  # same model, same run
    assert got.image.dtype == torch.float64 and got.image.shape == (3, 12 * 16 + 6 * 8 + 3 * 4)  # padded to 48 x 64
    torch.testing.assert_close(got.image, ref_i, **F64)
    torch.testing.assert_close(got.query, ref_q, **F64)
    assert got.queries.tolist() == [4, 0, 4] and got.labels.tolist() == [7, 2, 1]
    assert (got.image >= 0).all() and (got.image.sum(1) > 0).all()
    assert not torch.allclose(got.image[0], got.image[2])  # a different class of the same query: other gradients
    assert got.spatial_shapes == ([(12, 16), (6, 8), (3, 4)] if cross_attention == "deformable" else None)


def test_deformable_matrix_is_the_sampling_as_a_dense_map():
    torch.manual_seed(1)
    shapes = [(5, 7), (3, 2), (1, 1)]
    b, h, lq, p, d = 2, 3, 4, 5, 6
    s = sum(a * c for a, c in shapes)
    value = torch.randn(b, s, h, d, dtype=torch.float64)
    loc = torch.rand(b, lq, h, len(shapes), p, 2, dtype=torch.float64) * 1.4 - 0.2  # some points outside
    w = torch.rand(b, lq, h, len(shapes), p, dtype=torch.float64)
    a = deformable_attention_matrix(loc.transpose(1, 2), w.transpose(1, 2), shapes)
    assert a.shape == (b, h, lq, s)
    expected = deformable.multi_scale_deformable_attention(value, shapes, loc, w).view(b, lq, h, d)
    torch.testing.assert_close(torch.einsum("bhqs,bshd->bqhd", a, value), expected, **F64)
    with pytest.raises(ValueError, match=r"NL=2, P, 2\) and attention_weights"):
        deformable_attention_matrix(loc.transpose(1, 2), w.transpose(1, 2), shapes[:2])


def test_detection_maps_relevance_method_and_errors():
    model = _model("deformable").float()
    model.max_detections = 4  # one backward pass per detection: keep it short
    images = torch.rand(2, 1, 40, 56)
    att = detection_maps(model, images, score_threshold=0.0)
    rel = detection_maps(model, images, score_threshold=0.0, method="relevance")
    for a, r in zip(att, rel):
        assert torch.equal(a.detections.queries, r.detections.queries)
        torch.testing.assert_close(r.detections.boxes, a.detections.boxes, atol=1e-4, rtol=1e-4)
        n = len(r.detections)
        assert n > 0 and r.maps.shape == (n, 40, 56) and r.hits.shape == (n,) and (r.maps >= 0).all()
    with pytest.raises(ValueError, match="method must be one of"):
        detection_maps(model, images, method="rollout")
    run = lambda: model.forward_raw(images[:1])  # noqa: E731
    with pytest.raises(ValueError, match=r"label in \[0, 10\)"):
        query_relevance(model, run, [(0, 10)])
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        query_relevance(model, run, [0, 1, 2])
    with pytest.raises(ValueError, match="one image"):
        query_relevance(model, lambda: model.forward_raw(images), [(0, 1)])
    with pytest.raises(ValueError, match=r"logits \(1, Q, classes\) of one image, got \(2, 1, 6, 4\)"):
        query_relevance(model, run, [(0, 1)], logits=lambda out: out.boxes)
    with pytest.raises(TypeError, match="cannot find"):
        query_relevance(model, lambda: model.forward_raw(images[:1]).boxes, [(0, 1)])
    empty = query_relevance(model, run, [])
    assert empty.image.shape == (0, 252) and empty.query.shape == (0, 6)
    assert relevance_maps(empty, (48, 64)).shape == (0, 48, 64)
    with pytest.raises(ValueError, match="spatial_shapes"):
        relevance_maps(empty.__class__(**{**empty.__dict__, "spatial_shapes": None}), (48, 64))


def test_hf_detr_matches_generic_relevance_and_deformable_hf_models_run():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = hf_detectors(transformers)
    x = torch.rand(1, 3, 64, 64)
    detr = models["detr"].eval()
    got = query_relevance(detr, {"pixel_values": x}, [(3, 1), (0, 2)])
    for row, (q, c) in zip(got.image, [(3, 1), (0, 2)]):
        generic = relevance(detr, {"pixel_values": x}, target=lambda out, q=q, c=c: out.logits[:, q, c])
        torch.testing.assert_close(row, generic.get("model.decoder.layers", "model.encoder.layers")[0, q])
    maps = relevance_maps(got, (64, 64), spatial_shapes=[(2, 2)])  # one stride-32 level
    assert maps.shape == (2, 64, 64)
    torch.testing.assert_close(maps.sum((1, 2)), got.image.sum(1))
    for arch in ("deformable_detr", "rt_detr"):
        res = query_relevance(models[arch].eval(), {"pixel_values": x}, [(1, 0)])
        assert res.spatial_shapes == [(8, 8), (4, 4), (2, 2)] and res.image.shape == (1, 84)
        assert (res.image >= 0).all() and res.image.sum() > 0
        assert relevance_maps(res, (64, 64), sigma=1.0).shape == (1, 64, 64)
