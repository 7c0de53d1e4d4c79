"""Gold alignments of the date task from babel's CLDR patterns, and the seq2seq models' source-target maps."""

import datetime

import pytest
import torch

from attnkit.ablation.date_alignment import (
    DIGIT_ROWS,
    alignment_scores,
    date_fields,
    gold_alignment,
    source_target_maps,
    teacher_inputs,
)
from attnkit.ablation.dates import CharVocab, DateExample, format_date_example
from attnkit.ablation.seq2seq import build_seq2seq
from attnkit.explain import capture
from attnkit.explain.metrics import alignment_error_rate

pytest.importorskip("babel")
DAY = datetime.date(2021, 9, 3)


def _pairs(m):
    return {tuple(ix) for ix in m.nonzero().tolist()}


def test_fields_and_links_of_a_worded_month():
    ex = format_date_example(DAY, "fr", "medium")  # '3 sept. 2021'
    assert ex.source == "3 sept. 2021"
    assert date_fields(ex) == {"day": (0, 1), "month": (2, 7), "year": (8, 12)}
    sure, possible = gold_alignment(ex, source_length=15)
    assert sure.shape == possible.shape == (10, 15)
    assert _pairs(sure) == {(0, 8), (1, 9), (2, 10), (3, 11), (9, 0)}  # year digits; the day's "3"
    assert _pairs(possible) == _pairs(sure) | {(8, 0)} | {(t, j) for t in (5, 6) for j in range(2, 7)}


def test_numeric_fields_are_all_sure_and_weekdays_have_no_links():
    ex = format_date_example(DAY, "de", "medium")  # '03.09.2021'
    sure, possible = gold_alignment(ex)
    assert torch.equal(sure, possible)
    assert _pairs(sure) == {(8, 0), (9, 1), (5, 3), (6, 4), (0, 6), (1, 7), (2, 8), (3, 9)}
    ex = format_date_example(datetime.date(1999, 12, 25), "da", "full")  # 'lørdag den 25. december 1999'
    spans = date_fields(ex)
    assert ex.source[slice(*spans["weekday"])] == "lørdag" and ex.source[slice(*spans["month"])] == "december"
    sure, possible = gold_alignment(ex)
    assert not possible[:, slice(*spans["weekday"])].any() and not possible[[4, 7]].any()  # weekday, hyphens
    assert _pairs(sure[8:]) == {(0, 11), (1, 12)}


def test_a_source_babel_did_not_render_is_refused():
    with pytest.raises(ValueError, match="not babel's"):
        date_fields(DateExample("3 sept 2021", "2021-09-03", "fr", "medium"))
    with pytest.raises(ValueError, match="source_length"):
        gold_alignment(format_date_example(DAY, "en", "long"), source_length=3)


def test_gold_maps_score_zero_and_shifted_maps_do_not():
    examples = [format_date_example(DAY, lang, fmt) for lang in ("en", "de", "pl") for fmt in ("medium", "full")]
    width = max(len(e.source) for e in examples)
    links = [gold_alignment(e, source_length=width) for e in examples]
    sure = torch.stack([s for s, _ in links])[:, list(DIGIT_ROWS)]
    possible = torch.stack([p for _, p in links])[:, list(DIGIT_ROWS)]
    soft = possible.float() + sure.float()  # peaks on a sure link where there is one, else on a possible one
    assert float(alignment_error_rate(soft, sure, possible, reduction="corpus")) == 0.0
    shifted = torch.roll(soft, 1, dims=-1)
    assert float(alignment_error_rate(shifted, sure, possible, reduction="corpus")) > 0.5


@pytest.fixture(scope="module")
def data():
    examples = [
        format_date_example(DAY + datetime.timedelta(days=37 * i), lang, fmt)
        for i, (lang, fmt) in enumerate([("en", "medium"), ("fr", "long"), ("de", "medium"), ("es", "full")])
    ]
    return examples, CharVocab("".join(e.source for e in examples)), CharVocab("0123456789-")


@pytest.mark.parametrize("name", ["additive", "luong", "transformer"])
def test_source_target_maps(name, data):
    examples, sv, tv = data
    torch.manual_seed(0)
    model = build_seq2seq(name, len(sv), len(tv)).eval()
    src, lengths, tgt_in, gold = teacher_inputs(examples, sv, tv)
    maps = source_target_maps(model, src, lengths, tgt_in, gold)
    assert set(maps) == ({"raw", "rollout", "relevance"} if name == "transformer" else {"raw", "relevance"})
    pad = torch.arange(src.shape[1])[None, None, :] >= lengths[:, None, None]
    for m in maps.values():
        assert m.shape == (4, 10, src.shape[1]) and bool((m >= 0).all())
        assert float(m.masked_select(pad).abs().max()) == 0.0
    torch.testing.assert_close(maps["raw"].sum(-1), torch.ones(4, 10))
    if name == "transformer":
        torch.testing.assert_close(maps["raw"], model.alignments(src, lengths, gold))
        torch.testing.assert_close(maps["rollout"].sum(-1), torch.ones(4, 10))
    else:
        # reference: autograd straight to the weights tensor on the path of the output (the additive module's own
        # output; Luong's general score runs through attnkit.attention, whose differentiable capture records it)
        steps = []
        h = model.attn.register_forward_hook(lambda _m, _a, out: steps.append(out[1]))
        with torch.enable_grad(), capture(model, differentiable=True) as rec:
            logits = model(src, lengths, tgt_in)
        h.remove()
        if name == "luong":
            steps = [m.weights for m in rec.maps]
        for t in (0, 6, 9):
            score = logits[:, t].gather(1, gold[:, t : t + 1]).sum()
            (g,) = torch.autograd.grad(score, [steps[t]], retain_graph=True)
            want = (g * steps[t]).clamp_min(0).reshape(4, -1)
            torch.testing.assert_close(maps["relevance"][:, t], want, atol=1e-6, rtol=1e-5)
    scores = alignment_scores(model, examples, sv, tv, batch_size=3)
    assert set(scores) == set(maps) and all(0.0 <= v <= 1.0 for v in scores.values())


def test_models_without_attention_are_refused(data):
    examples, sv, tv = data
    model = build_seq2seq("none", len(sv), len(tv)).eval()
    with pytest.raises(ValueError, match="no attention"):
        source_target_maps(model, *teacher_inputs(examples, sv, tv))
    with pytest.raises(ValueError, match="unknown methods"):
        source_target_maps(model, *teacher_inputs(examples, sv, tv), methods=("flow",))
