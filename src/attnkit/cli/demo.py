"""``attnkit demo``: the main job on real input, offline — one HTML report and a terminal summary.

1. Language: the real pretrained all-MiniLM-L6-v2 in attnkit's BertModel explains real sentences, among them
   the ambiguity pair "I sat on the bank of the river" / "I deposited cash at the bank".
2. Vision: two small models trained here on real handwritten digits (scikit-learn's ``load_digits``) placed on
   cluttered 64x64 canvases; accuracy, rollout / relevance / CBAM heatmaps, pointing game and deletion AUC
   against a random saliency baseline, on held-out canvases whose digits were never seen in training.
3. Detection: the shipped RT-DETR-style digit detector and its CenterNet baseline on held-out scenes of several
   digits (COCO mAP), with what each detection looked at (deformable sampling points) and its pointing game.
4. Efficiency: attention backends timed on this machine (the numbers ``attnkit bench`` prints).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from attnkit.cli.checks import check_out_dir, check_out_file
from attnkit.cli.demo_detection import detection_part
from attnkit.cli.registry import subcommand

AMBIGUITY = ("I sat on the bank of the river", "I deposited cash at the bank")
CONTROL = "The bank approved my loan application"  # same (financial) sense as the second sentence
SENTENCES = (
    *AMBIGUITY,
    "The cat sat on the mat because it was tired.",
    "Attention lets a network weight parts of its input by relevance.",
)
SPECIAL = ("[CLS]", "[SEP]")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("attnkit-demo"), help="output directory (default attnkit-demo)"
    )
    parser.add_argument("--fast", action="store_true", help="fewer canvases and shorter timings (same code path)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report.html in --out")


def _similarity_figure(sim_senses, sim_same):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3), layout="constrained")
    ax = fig.add_subplot()
    layers = range(len(sim_senses))
    ax.plot(layers, sim_senses.tolist(), marker="o", label="river vs cash (different senses)")
    ax.plot(layers, sim_same.tolist(), marker="s", label="cash vs loan (same sense)")
    ax.set_xticks(list(layers), ["emb"] + [f"L{i}" for i in range(len(sim_senses) - 1)])
    ax.set_ylabel('cosine of "bank" embeddings')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def language_part():
    """Sections and summary rows for the real pretrained MiniLM."""
    from attnkit.cli.explain_text import load
    from attnkit.cli.reports import text_sections
    from attnkit.explain.report import HeadMaps, Section
    from attnkit.text import capture_maps, token_scores
    from attnkit.text.contextual import layer_similarity, word_in_context

    tm = load(None)
    river, cash, control = (word_in_context(tm, s, "bank") for s in (*AMBIGUITY, CONTROL))
    sim_senses, sim_same = layer_similarity(river, cash), layer_similarity(cash, control)
    num_layers = river.attention.shape[0]
    rows = [
        [
            layer,
            ", ".join(f"{t} {w:.2f}" for t, w in river.top(layer, k=3, skip=SPECIAL)),
            ", ".join(f"{t} {w:.2f}" for t, w in cash.top(layer, k=3, skip=SPECIAL)),
            f"{float(sim_senses[layer + 1]):.3f}",
            f"{float(sim_same[layer + 1]):.3f}",
        ]
        for layer in range(num_layers)
    ]
    layer_names = [f"layer {i}" for i in range(num_layers)]
    sections = [
        Section(
            'Language: what "bank" attends to, and how its meaning moves',
            text=(
                "all-MiniLM-L6-v2 (real pretrained weights, loaded into attnkit's BertModel). Per layer: the tokens "
                '"bank" attends to most (mean over heads; [CLS]/[SEP], which many heads use as a no-op sink, left '
                'out), and the cosine similarity of the contextual embedding of "bank" between the river and the '
                f'cash sentence, next to a same-sense control ("{CONTROL}" vs the cash sentence).'
            ),
            table=rows,
            table_header=["layer", AMBIGUITY[0], AMBIGUITY[1], "cos river/cash", "cos cash/loan"],
            figures=[_similarity_figure(sim_senses, sim_same)],
        )
    ]
    for wic in (river, cash):
        sections.append(
            Section(
                f'"bank" in "{wic.text}": its attention row, per layer and head',
                text="Pick a layer and a head (or their mean): the row shows how much of each token flows into "
                '"bank". Hover for values.',
                head_maps=HeadMaps(
                    wic.attention[:, :, None, :], query_tokens=["bank"], key_tokens=wic.tokens, layer_names=layer_names
                ),
            )
        )
    batch = tm.encode(list(SENTENCES))
    maps, _ = capture_maps(tm, batch)
    scores = token_scores(tm, batch, method="rollout", maps=maps)
    sections += text_sections(tm, batch, maps, scores, SENTENCES, "rollout")
    summary = [
        (
            "language",
            'cos("bank" by the river, "bank" with cash), last layer',
            f"{float(sim_senses[-1]):.3f}",
            f"same sense: {float(sim_same[-1]):.3f}",
        )
    ]
    return sections, summary


#: Deletion steps: 64 pixels per step on the 64x64 canvases (the setting scripts/train_digits.py records).
DELETION_STEPS = 64
VISION_METHODS = {"vit": ("rollout", "relevance", "random", "ink"), "cnn": ("cbam", "random", "ink")}


def vision_part(fast: bool):
    """Sections and summary rows for the two digit models shipped with attnkit."""
    from attnkit.datasets.digits import DigitCanvases
    from attnkit.explain import plots
    from attnkit.explain.metrics import deletion, pointing_game
    from attnkit.explain.report import Section
    from attnkit.explain.saliency import accuracy, predict, saliency
    from attnkit.vision.digits import load_metadata, load_model

    try:
        meta = load_metadata()
    except FileNotFoundError as exc:  # a source checkout without the trained weights
        text = f"The trained digit models are missing ({exc}). Train them with: python scripts/train_digits.py"
        return [Section("Vision: real handwritten digits on cluttered canvases", text=text)], [
            ("vision", "shipped digit models", "missing", "run scripts/train_digits.py")
        ]
    data = DigitCanvases("test", num_canvases=200 if fast else 500, seed=2024)
    images, labels, boxes = data.images, data.labels, data.boxes
    rows, summary, figures = [], [], []
    generator = torch.Generator().manual_seed(0)
    shown = slice(0, 8)
    for name, methods in VISION_METHODS.items():
        model = load_model(name).eval()
        acc = accuracy(model, images, labels)
        preds = predict(model, images[shown])
        titles = [f"label {int(y)} / pred {int(p)}" for y, p in zip(labels[shown], preds)]
        scores = {}
        for method in methods:
            maps = saliency(method, model, images, generator=generator)
            hits = pointing_game(maps, boxes).float().mean().item()
            auc = deletion(model, images, maps, target=labels, steps=DELETION_STEPS, batch_size=256).auc.mean().item()
            scores[method] = (hits, auc)
            rows.append([name, f"{acc:.1%}", method, f"{hits:.2f}", f"{auc:.3f}"])
            if method not in ("random", "ink"):
                fig = plots.image_overlays(images[shown], maps[shown], titles=titles, ncols=8)
                fig.suptitle(f"{name}: {method}", fontsize=10)
                figures.append(fig)
        best = methods[0]
        summary.append(
            (
                "vision",
                f"{name} test accuracy; {best} pointing game / deletion AUC",
                f"{acc:.1%}; {scores[best][0]:.2f} / {scores[best][1]:.3f}",
                "; ".join(f"{b} {scores[b][0]:.2f} / {scores[b][1]:.3f}" for b in ("random", "ink")),
            )
        )
    models_meta = meta.get("models", {})
    trained = ", ".join(
        f"{n}: {models_meta[n]['training']['seconds']:.0f} s of training"
        for n in VISION_METHODS
        if "training" in models_meta.get(n, {})
    )
    section = Section(
        "Vision: real handwritten digits on cluttered canvases",
        text=(
            "scikit-learn's load_digits scans (real 8x8 handwriting, upscaled 2x) placed at random on 64x64 canvases "
            "among decoys: clumps of fragments of other digits carrying about as much ink as a digit, so finding the "
            "most ink does not find the digit. Test canvases use scans never seen in training. Models: a "
            "VisionTransformer and a HybridResNet with CBAM, trained by scripts/train_digits.py "
            f"({trained}) and shipped as safetensors. Pointing game (Zhang et al. 2018): the fraction of canvases "
            "whose saliency peak falls in the digit's box; higher is better. Deletion AUC (Petsiuk et al. 2018): "
            "the class probability while the most salient pixels are removed first; lower is better. Baselines: "
            "random (uniform-noise saliency) and ink (a 15x15 blur of the canvas: 'point at the most ink'). "
            f"{len(labels)} test canvases."
        ),
        table=rows,
        table_header=["model", "test accuracy", "saliency", "pointing game", "deletion AUC"],
        figures=figures,
    )
    return [section], summary


def efficiency_part(fast: bool):
    """The ``attnkit bench`` table for this machine."""
    from attnkit.benchmark import run_attention_benchmark
    from attnkit.cli.bench import cases
    from attnkit.explain.report import Section

    results = run_attention_benchmark(cases(fast), budget_s=0.5 if fast else 2.0, max_math_length=1024)
    table = [[r.case, r.contender, f"{r.median_s * 1e3:.2f}", f"{r.ratio_vs_sdpa:.2f}x"] for r in results]
    section = Section(
        "Efficiency: attention backends on this machine",
        text=(
            f"Medians of interleaved runs, float32, B=1, H=8, D=64, {torch.get_num_threads()} threads. Ratio: "
            "throughput relative to a direct torch scaled_dot_product_attention call with the same mask (> 1 is "
            "faster). `attnkit bench` prints the same table."
        ),
        table=table,
        table_header=["case", "contender", "median ms", "vs SDPA"],
    )
    window = [r for r in results if "window" in r.case and r.contender != "torch SDPA (direct)"]
    best = max(window, key=lambda r: r.ratio_vs_sdpa)
    summary = [
        (
            "efficiency",
            f"sliding window, {best.case.split()[0]}: fastest attnkit backend",
            best.contender.removeprefix("attnkit "),
            f"{best.ratio_vs_sdpa:.2f}x SDPA with mask",
        )
    ]
    return [section], summary


def _print_summary(rows, seconds: float) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(4)]
    print("\nattnkit demo — summary")
    for r in rows:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    print(f"  ({seconds:.0f} s)")


def run(args: argparse.Namespace) -> int:
    from attnkit.cli.reports import write_report

    out_dir: Path = check_out_dir(args.out)
    path = out_dir / "report.html"
    if out_dir.is_dir():
        check_out_file(path, overwrite=args.overwrite)
    start = time.perf_counter()
    parts = (
        ("language (all-MiniLM-L6-v2)", language_part),
        ("vision (digits)", lambda: vision_part(args.fast)),
        ("detection (digit scenes)", lambda: detection_part(args.fast)),
        ("efficiency (backends)", lambda: efficiency_part(args.fast)),
    )
    sections, summary = [], []
    for label, part in _progress(parts):
        print(f"... {label}", flush=True)
        s, rows = part()
        sections += s
        summary += rows
    out_dir.mkdir(parents=True, exist_ok=True)
    write_report(path, sections, title="attnkit demo: where do models attend?", overwrite=args.overwrite)
    _print_summary(summary, time.perf_counter() - start)
    print(f"\nreport: {path}")
    return 0


def _progress(items):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="attnkit demo", unit="part", leave=False)


subcommand("demo", "run the main job on real input, offline: language, vision, efficiency -> report.html")(
    add_arguments, run
)
