"""Which explanation method to trust: every method x every metric of ``attnkit.explain.evaluate`` on two tasks.

(a) the shipped digit ViT (``attnkit.vision.digits``) on held-out canvases (test scans, the evaluation seed of
    ``scripts/train_digits.py``), the explained score being the probability of the true digit; maps are upsampled
    to pixels (the "pixels" rows of LRP are ``lrp(..., pixels=True)``'s own pixel maps); deletion/insertion over
    pixels in 64 steps (as the shipped metadata's deletion AUC), baseline 0 (black); pointing game against the
    digit's box; randomisation of the blocks top-down (head, norm, last block ... first block, patch embedding).
(c) the date seq2seq models (Bahdanau, Luong, Transformer; trained by ``benchmarks/explanation_tasks.py``), the
    score being the mean probability of the gold ISO characters under teacher forcing; maps are target x source
    (``attnkit.ablation.date_alignment``), summed over the digit rows for the perturbation metrics, whose
    removed characters become ``<unk>``; alignment error rate on the digit rows; randomisation of the modules
    top-down (output layer first). Sources are grouped by length (no padding inside a group) and the metrics are
    averaged over the groups weighted by size.

    flock /tmp/attnkit-heavy.lock python benchmarks/explanations.py            # the table (trains the date models once)
    flock /tmp/attnkit-heavy.lock python benchmarks/explanations.py --quick    # smoke run
    flock /tmp/attnkit-heavy.lock python benchmarks/explanations.py --task digits --only LRP   # (a), LRP rows only
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from explanation_tasks import (
    DATE_MODELS,
    date_exact_match,
    date_models,
    date_task,
    minilm_pairs,
    pair_cosine,
    pair_embeddings,
)

from attnkit.ablation.date_alignment import DIGIT_ROWS, gold_alignment, source_target_maps, teacher_inputs
from attnkit.ablation.dates import UNK
from attnkit.explain import attention_norms, capture, relevance, rollout, value_zeroing
from attnkit.explain import saliency as ev
from attnkit.explain.evaluate import EvaluationTask, evaluate
from attnkit.explain.lrp import lrp

METRICS = ("deletion", "insertion", "comprehensiveness", "sufficiency", "pointing", "aer", "randomization")
EVAL_SEED = 20240  # scripts/train_digits.py's held-out evaluation canvases
PIXEL_BOUNDS = (0.0, 1.0)  # the canvases' pixel range (attnkit.datasets.DigitCanvases)


def _vit_methods(prefix: int, grid: tuple[int, int], size: tuple[int, int]):
    gh, gw = grid

    def cls_row(full):
        return ev.upsample(full[:, 0, prefix:].reshape(-1, gh, gw), size)

    def raw(model, x):
        with torch.no_grad(), capture(model) as rec:
            model(x)
        return cls_row(rec.maps[-1].weights.mean(1))

    def relevance(model, x):
        with torch.no_grad():
            target = model(x).argmax(-1)
        return ev.upsample(ev.relevance_maps(model, x, target), size)

    def lrp_method(rule):
        def method(model, x):
            with torch.no_grad():
                target = model(x).argmax(-1)
            tokens = lrp(model, x, target, rule=rule, pixels=False).relevance.float()
            return ev.upsample(tokens[:, prefix:].reshape(-1, gh, gw), size)

        return method

    def pixel_lrp(rule, pixel_rule, per_patch=False):
        def method(model, x):
            with torch.no_grad():
                target = model(x).argmax(-1)
            got = lrp(model, x, target, rule=rule, pixels=True, pixel_rule=pixel_rule, bounds=PIXEL_BOUNDS)
            maps = got.relevance.float()
            if per_patch:  # the pixel relevance summed over each patch, upsampled as the token maps are
                maps = ev.upsample(torch.nn.functional.avg_pool2d(maps[:, None], size[0] // gh)[:, 0], size)
            return maps

        return method

    return {
        "raw attention (last layer)": raw,
        "rollout": lambda m, x: ev.upsample(ev.rollout_maps(m, x), size),
        "relevance (Chefer)": relevance,
        "attention-norm rollout": lambda m, x: cls_row(attention_norms(m, x).rollout()),
        "value-zeroing rollout": lambda m, x: cls_row(value_zeroing(m, x).rollout()),
        "AttnLRP": lrp_method("attnlrp"),
        "CP-LRP": lrp_method("cp-lrp"),
        "AttnLRP, pixels (z^B)": pixel_lrp("attnlrp", "zb"),
        "CP-LRP, pixels (z^B)": pixel_lrp("cp-lrp", "zb"),
        "AttnLRP, pixels (LRP-0)": pixel_lrp("attnlrp", "lrp-0"),
        "CP-LRP, pixels (LRP-0)": pixel_lrp("cp-lrp", "lrp-0"),
        "AttnLRP, pixels (z^B) per patch": pixel_lrp("attnlrp", "zb", per_patch=True),
        "CP-LRP, pixels (z^B) per patch": pixel_lrp("cp-lrp", "zb", per_patch=True),
        "ink (baseline)": lambda m, x: ev.ink_maps(x),
        "random (baseline)": lambda m, x: torch.rand(x.shape[0], *size, generator=torch.Generator().manual_seed(0)),
    }


def lrp_conservation(num: int) -> dict[str, float]:
    """Median conservation error of AttnLRP and CP-LRP on the digit ViT (the explained logit: the prediction), at
    the first layer's tokens and at the pixels (z^B with the canvases' bounds)."""
    from attnkit.datasets import DigitCanvases
    from attnkit.vision.digits import load_model

    model = load_model("vit").eval()
    images = DigitCanvases("test", num_canvases=num, seed=EVAL_SEED).images
    with torch.no_grad():
        target = model(images).argmax(-1)
    return {
        f"{rule} {level} conserve={conserve}": float(
            lrp(
                model, images, target, rule=rule, conserve=conserve, pixels=level == "pixels", bounds=PIXEL_BOUNDS
            ).conservation.median()
        )
        for rule in ("attnlrp", "cp-lrp")
        for level in ("tokens", "pixels")
        for conserve in (True, False)
    }


def digits_table(num: int, steps: int, only: list[str] | None = None) -> dict:
    from attnkit.datasets import DigitCanvases
    from attnkit.vision.digits import load_model

    model = load_model("vit").eval()
    data = DigitCanvases("test", num_canvases=num, seed=EVAL_SEED)
    with torch.no_grad():
        model(data.images[:1])
    layout = model.token_layout
    size = tuple(data.images.shape[-2:])
    blocks = [f"blocks.{i}" for i in reversed(range(len(model.blocks)))]
    task = EvaluationTask(
        model=model,
        x=data.images,
        score_fn=lambda m, x: m(x),
        target=data.labels,
        pointing_target=data.boxes,
        randomize=["head", "norm", *blocks, "patch_embed"],
        steps=steps,
        batch_size=256,
    )
    methods = _vit_methods(layout["num_prefix_tokens"], tuple(layout["grid"]), size)
    if only:
        methods = {name: f for name, f in methods.items() if any(o.lower() in name.lower() for o in only)}
        if not methods:
            raise SystemExit(f"explanations: --only {only} matches no method")
    return evaluate(task, methods, metrics=METRICS)


def _flat(x, pad_id):
    ids = x.reshape(-1, x.shape[-1])
    return {"input_ids": ids, "attention_mask": (ids != pad_id).long()}


def _pair_score(x, pad_id, *, split: bool):
    """``hidden (2P, L, E) -> `` the pair cosine ``(P,)``, or with ``split`` its LRP form ``(2P,)``: the uniform
    rule on the product ``a · b`` with the norms constant (each sentence's score is half the cosine)."""
    mask = (x.reshape(-1, x.shape[-1]) != pad_id)[..., None].float()

    def score(hidden):
        e = ((hidden * mask).sum(1) / mask.sum(1)).reshape(*x.shape[:2], -1)
        a, b = e[:, 0], e[:, 1]
        if not split:
            return torch.nn.functional.cosine_similarity(a, b, dim=-1)
        norms = (a.norm(dim=-1) * b.norm(dim=-1)).detach()
        return (0.5 * torch.stack([(a * b.detach()).sum(-1), (a.detach() * b).sum(-1)], 1) / norms[:, None]).reshape(-1)

    return score


def _pair_lrp(model, x, pad_id, rule, conserve=True):
    return lrp(model, _flat(x, pad_id), _pair_score(x, pad_id, split=True), rule=rule, conserve=conserve)


def _text_methods(pad_id: int):
    """Methods for ``(P, 2, L)`` sentence-pair ids: token scores ``(P, 2, L)`` for the pair's cosine similarity.

    Maps ``(2P, L, L)`` (raw attention, rollouts, Chefer relevance) become token scores by averaging the rows of
    the real tokens: the score is read from the mean of all token outputs.
    """

    def columns(maps, x):
        real = (x.reshape(-1, x.shape[-1]) != pad_id).to(maps.dtype)
        return ((maps * real[:, :, None]).sum(1) / real.sum(1, keepdim=True)).reshape(x.shape)

    def captured(model, x):
        with torch.no_grad(), capture(model) as rec:
            model(**_flat(x, pad_id))
        return rec.maps

    def chefer(model, x):
        return columns(relevance(model, _flat(x, pad_id), _pair_score(x, pad_id, split=False)).get(), x)

    def lrp_method(rule):
        return lambda m, x: _pair_lrp(m, x, pad_id, rule).relevance.float().reshape(x.shape)

    return {
        "raw attention (last layer)": lambda m, x: columns(captured(m, x)[-1].weights.mean(1), x),
        "rollout": lambda m, x: columns(rollout(captured(m, x)), x),
        "relevance (Chefer)": chefer,
        "attention-norm rollout": lambda m, x: columns(attention_norms(m, _flat(x, pad_id)).rollout(), x),
        "value-zeroing rollout": lambda m, x: columns(value_zeroing(m, _flat(x, pad_id)).rollout(), x),
        "AttnLRP": lrp_method("attnlrp"),
        "CP-LRP": lrp_method("cp-lrp"),
        "random (baseline)": lambda m, x: torch.rand(x.shape, generator=torch.Generator().manual_seed(0)),
    }


def text_table(num: int, steps: int, removal: str = "pad") -> tuple[dict, dict]:
    task_data = minilm_pairs(num, removal=removal)
    model, ids, pad = task_data.model, task_data.ids, task_data.pad_id
    layers = [f"layers.{i}" for i in reversed(range(len(model.layers)))]
    task = EvaluationTask(
        model=model,
        x=ids,
        score_fn=lambda m, x: pair_cosine(m, x, pad),
        baseline=task_data.baseline,
        units_mask=task_data.units,
        randomize=[*layers, "embeddings"],
        steps=steps,
    )
    table = evaluate(task, _text_methods(pad), metrics=METRICS)
    with torch.no_grad():
        e = pair_embeddings(model, ids, pad)
    facts = {"mean cosine": float(torch.nn.functional.cosine_similarity(e[:, 0], e[:, 1]).mean())}
    for rule in ("attnlrp", "cp-lrp"):
        for conserve in (True, False):
            got = _pair_lrp(model, ids, pad, rule, conserve)
            per_pair = got.relevance.sum(-1).reshape(len(ids), 2).sum(-1)
            cos = got.logit.reshape(len(ids), 2).sum(-1)
            facts[f"{rule} conserve={conserve}"] = float(((per_pair - cos).abs() / cos.abs()).median())
    return table, facts


def _date_methods(kind: str):
    names = ("raw", "rollout", "relevance") if kind == "transformer" else ("raw", "relevance")

    def make(name):
        def method(model, x, ctx):
            return source_target_maps(model, x, ctx["lengths"], ctx["tgt_in"], ctx["gold"], methods=(name,))[name]

        return method

    out = {name: make(name) for name in names}
    if kind == "transformer":
        for label, rule in (("AttnLRP", "attnlrp"), ("CP-LRP", "cp-lrp")):
            out[label] = lambda m, x, ctx, rule=rule: _date_lrp(m, x, ctx, rule)
    out["random (baseline)"] = lambda m, x, ctx: torch.rand(
        x.shape[0], 10, x.shape[1], generator=torch.Generator().manual_seed(0)
    )
    return out


def _date_lrp(model, x, ctx, rule):
    """``(B, T, S)``: row ``t`` (digit rows only, the others 0) is the relevance of the source characters for the
    logit of the gold character ``t`` (published rules: the decoder's own inputs keep their share)."""
    gold = ctx["gold"]
    out = torch.zeros(x.shape[0], gold.shape[1], x.shape[1])
    for t in DIGIT_ROWS:
        res = lrp(
            model,
            (x, ctx["lengths"], ctx["tgt_in"]),
            lambda logits, t=t: logits[:, t].gather(1, gold[:, t, None])[:, 0],
            rule=rule,
            conserve=False,
        )
        out[:, t] = res.relevance.float()
    return out


def _top_down(name: str, model) -> list[str]:
    if name == "transformer":
        dec = [f"decoder.{i}" for i in reversed(range(len(model.decoder)))]
        enc = [f"encoder.{i}" for i in reversed(range(len(model.encoder)))]
        return ["out", *dec, *enc, "tgt_embed", "src_embed"]
    extra = ["combine"] if name == "luong" else []
    return ["out", *extra, "attn", "cell", "tgt_embed", "init_state", "encoder", "src_embed"]


def dates_table(per_group: int, groups: int, steps: int, cache: Path) -> tuple[dict, dict]:
    task_data = date_task()
    models = date_models(task_data, cache, log=lambda s: print(s, file=sys.stderr))
    exact = {name: date_exact_match(m, task_data) for name, m in models.items()}
    counts = Counter(len(e.source) for e in task_data.test)
    lengths = [n for n, _ in counts.most_common(groups)]
    tables = {}
    for name in DATE_MODELS:
        model = models[name]
        rows: dict[str, dict[str, float]] = {}
        total = 0
        for length in lengths:
            examples = [e for e in task_data.test if len(e.source) == length][:per_group]
            src, lens, tgt_in, gold = teacher_inputs(examples, task_data.source_vocab, task_data.target_vocab)
            links = [gold_alignment(e) for e in examples]
            sure, possible = torch.stack([s for s, _ in links]), torch.stack([p for _, p in links])
            ctx = {"lengths": lens, "tgt_in": tgt_in, "gold": gold}

            def score(m, x, ctx=ctx):
                logp = m(x, ctx["lengths"], ctx["tgt_in"]).softmax(-1).gather(-1, ctx["gold"][..., None])[..., 0]
                return logp[:, list(DIGIT_ROWS)].mean(-1)

            methods = {k: (lambda m, x, f=f, ctx=ctx: f(m, x, ctx)) for k, f in _date_methods(name).items()}
            task = EvaluationTask(
                model=model,
                x=src,
                score_fn=score,
                baseline=UNK,
                to_units=lambda maps: maps[:, list(DIGIT_ROWS)].sum(1),
                alignment=(sure, possible),
                alignment_rows=list(DIGIT_ROWS),
                randomize=_top_down(name, model),
                steps=steps,
            )
            table = evaluate(task, methods, metrics=METRICS)
            n = len(examples)
            total += n
            for method, row in table.items():
                acc = rows.setdefault(method, {})
                for metric, value in row.items():
                    acc[metric] = acc.get(metric, 0.0) + n * float(value)
        tables[name] = {m: {k: v / total for k, v in row.items()} for m, row in rows.items()}
    return tables, exact


def markdown(table: dict, title: str) -> str:
    cols = [
        c
        for c in ("deletion", "insertion", "comprehensiveness", "sufficiency", "pointing", "aer")
        if any(c in row for row in table.values())
    ]
    head = ["method", *cols, "randomisation ρ", "passes"]
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in table.items():
        cells = [f"{row[c]:.3f}" if c in row else "" for c in cols]
        verdict = "yes" if row.get("randomization", 1.0) < 0.5 else "**no**"
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {row.get('randomization', float('nan')):.2f} | {verdict} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=("digits", "text", "dates", "all"), default="all", help="which task(s) to run")
    p.add_argument("--quick", action="store_true", help="few inputs: a smoke run, not a result")
    p.add_argument("--canvases", type=int, default=100, help="digit canvases (default 100)")
    p.add_argument("--pairs", type=int, default=40, help="sentence pairs (default 40)")
    p.add_argument("--removal", choices=("pad", "unk"), default="pad", help="what a removed token becomes (text)")
    p.add_argument("--per-length", type=int, default=40, help="date sources per length group (default 40)")
    p.add_argument("--lengths", type=int, default=4, help="date length groups (default 4)")
    p.add_argument(
        "--only", action="append", help="(a) only the methods whose name contains this (repeatable), e.g. LRP"
    )
    p.add_argument("--cache", type=Path, default=Path("/tmp/attnkit-explanations"), help="trained date models")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    canvases, pairs, per_length, lengths, steps = (
        (16, 4, 6, 2, 8) if args.quick else (args.canvases, args.pairs, args.per_length, args.lengths, 64)
    )
    if args.task in ("digits", "all"):
        digits = digits_table(canvases, steps, args.only)
        print(markdown(digits, f"(a) digit ViT, {canvases} held-out canvases"), "\n", flush=True)
        print("LRP conservation error |sum R - logit| / |logit|, median:", lrp_conservation(canvases), flush=True)
    if args.task in ("text", "all"):
        text, facts = text_table(pairs, min(steps, 20), args.removal)
        title = f"(b) all-MiniLM-L6-v2, {pairs} sentence pairs, score = cosine, removed tokens: {args.removal}"
        print(markdown(text, title), "\n", flush=True)
        print("facts (LRP: median per-pair conservation error):", facts, flush=True)
    if args.task in ("dates", "all"):
        dates, exact = dates_table(per_length, lengths, min(steps, 20), args.cache)
        for name, table in dates.items():
            title = f"(c) date model {name!r} (test exact match {100 * exact[name]:.1f}%)"
            print(markdown(table, title), "\n", flush=True)
    print(f"wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
