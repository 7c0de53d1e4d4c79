"""``attnkit ablate``: does attention help my model? Train every variant under one budget, report accuracy and cost.

``attnkit ablate custom --model package.module:factory --data DIR|x.npz`` inserts attention into the user's own
model (:func:`attnkit.vision.insert_attention`) and trains it with and without; ``attnkit ablate vision`` trains
one small ResNet with each attention block (and a ViT) on the built-in cluttered digits or on the user's images;
``attnkit ablate seq2seq`` compares GRU encoder-decoders without attention, with Bahdanau or Luong attention, and a
small Transformer on date normalisation. All write ``results.md``, ``results.csv``, ``accuracy_vs_latency.png``,
``learning_curves.png`` and ``report.html`` (plus alignment heatmaps for seq2seq) into ``--out``. Launched with
``torchrun --nproc-per-node N``, training runs under DistributedDataParallel (gloo).

Default budgets (2 CPU cores, one thread per process, shared machine): see ``benchmarks/ablation_results.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnkit.cli.checks import check_out_dir
from attnkit.cli.registry import UserError, subcommand

VISION_EPOCHS, SEQ2SEQ_EPOCHS, CUSTOM_EPOCHS = 40, 20, 30  # the maximum under the default budget "plateau"


def _names(text: str, valid: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise UserError(f"unknown {what} {', '.join(map(repr, unknown)) or '(none given)'}; valid: {','.join(valid)}")
    return list(dict.fromkeys(names))


def _common(p: argparse.ArgumentParser, epochs: int) -> None:
    p.add_argument("--seeds", type=int, default=3, help="runs per variant, seeds 0..N-1 (default 3)")
    p.add_argument(
        "--budget",
        choices=("epochs", "plateau"),
        default="plateau",
        help="'plateau' (default): train until the validation score plateaus (early stopping, one lr drop), at "
        "most --epochs; 'epochs': every run trains --epochs epochs",
    )
    p.add_argument("--epochs", type=int, default=None, help=f"epochs, or the maximum (default {epochs}; --quick: 2)")
    p.add_argument("--patience", type=int, default=3, help="epochs without improvement = plateau (default 3)")
    p.add_argument(
        "--min-delta", type=float, default=0.005, help="smallest validation gain that counts (default 0.005)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=10.0,
        help="relative lift in %% that justifies rolling attention out (default 10)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="global batch size (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, one-cycle (default 3e-3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1: small models)")
    p.add_argument("--latency-rounds", type=int, default=20, help="interleaved timing rounds (default 20)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./ablation-<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quick", action="store_true", help="tiny budget: a smoke test in seconds, not a result")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS
    from attnkit.ablation.vision import VISION_VARIANTS

    parser.epilog = (
        "Writes results.md, results.csv, accuracy_vs_latency.png, learning_curves.png, report.html (and "
        "alignments_<model>.png) into --out. Several processes: "
        "torchrun --nproc-per-node 2 -m attnkit.cli.main ablate seq2seq"
    )
    from attnkit.cli.ablate_custom import add_custom

    sub = parser.add_subparsers(dest="task", metavar="TASK")
    sub.required = True
    add_custom(sub, _common, CUSTOM_EPOCHS)
    v = sub.add_parser(
        "vision",
        help="attention blocks in a small ResNet (and a ViT) on images",
        description="Train one small ResNet with each attention block (and a ViT) under one budget on the built-in "
        "cluttered digits, an ImageFolder directory (class sub-folders of PNG/JPEG) or an .npz with x and y "
        "(80/20 stratified split); report accuracy, params, MACs, latency and the lift over 'none'.",
    )
    v.add_argument("--data", default="digits", help="'digits' (built-in), an image folder, or an .npz with x/y")
    v.add_argument("--attention", default=",".join(VISION_VARIANTS), help="comma-separated variants (default: all)")
    v.add_argument("--train-canvases", type=int, default=None, help="digits: training canvases (default 1 per scan)")
    _common(v, VISION_EPOCHS)
    s = sub.add_parser(
        "seq2seq",
        help="GRU without / with attention and a Transformer on date normalisation",
        description="Dates written in words (CLDR formats of several languages, via babel) -> ISO 8601: GRU "
        "encoder-decoder without attention, with Bahdanau or Luong attention, and a small Transformer, scored by "
        "exact match per source-length bucket (including sources longer than any training one).",
    )
    s.add_argument("--models", default=",".join(SEQ2SEQ_MODELS), help="comma-separated models (default: all)")
    s.add_argument("--languages", default=None, help="comma-separated CLDR locales (default: 10 European ones)")
    s.add_argument("--train-size", type=int, default=None, help="training pairs (default 4000; --quick: 256)")
    s.add_argument("--test-per-bucket", type=int, default=None, help="test pairs per length bucket (default 300)")
    s.add_argument("--train-max-length", type=int, default=28, help="longest training source in chars (default 28)")
    _common(s, SEQ2SEQ_EPOCHS)


def _config(args: argparse.Namespace, default_epochs: int):
    from attnkit.ablation.train import TrainConfig

    epochs = args.epochs if args.epochs is not None else (2 if args.quick else default_epochs)
    for name, value in (
        ("--seeds", args.seeds),
        ("--epochs", epochs),
        ("--batch-size", args.batch_size),
        ("--threads", args.threads),
        ("--latency-rounds", args.latency_rounds),
        ("--patience", args.patience),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive, got {args.lr}")
    if not args.min_delta >= 0:
        raise UserError(f"--min-delta must be at least 0, got {args.min_delta}")
    if not args.threshold >= 0:
        raise UserError(f"--threshold must be at least 0 (a relative lift in %), got {args.threshold}")
    return TrainConfig(
        epochs=epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        budget=args.budget,
        patience=args.patience,
        min_delta=args.min_delta,
    )


def _progress(line: str) -> None:
    print(f"... {line}", file=sys.stderr, flush=True)


def _vision(args: argparse.Namespace):
    from attnkit.ablation.images import DataError, load_digits, load_image_data, stratified_split
    from attnkit.ablation.vision import VISION_VARIANTS, run_vision_ablation

    variants = _names(args.attention, VISION_VARIANTS, "attention")
    config = _config(args, VISION_EPOCHS)
    if args.data == "digits":
        n = args.train_canvases or (128 if args.quick else None)
        small = 64 if args.quick else None
        train, val, test = load_digits(
            train_canvases=n, val_canvases=small, test_canvases=small, splits=("train", "val", "test")
        )
    else:
        try:
            data = load_image_data(args.data)
            train_idx, test_idx = stratified_split(data.labels, test_fraction=0.2, seed=0)
        except DataError as err:
            raise UserError(str(err)) from None
        train, test, val = data.subset(train_idx), data.subset(test_idx), None  # val: 15% of train
    if len(train.labels) < config.batch_size:
        raise UserError(
            f"{len(train.labels)} training images are fewer than one batch (--batch-size {config.batch_size})"
        )
    return lambda: run_vision_ablation(
        train,
        test,
        val=val,
        variants=variants,
        seeds=range(args.seeds),
        config=config,
        latency_rounds=2 if args.quick else args.latency_rounds,
        progress=_progress,
    )


def _seq2seq(args: argparse.Namespace):
    from attnkit.ablation.dates import LANGUAGES, make_date_task
    from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS
    from attnkit.ablation.translation import run_seq2seq_ablation

    models = _names(args.models, SEQ2SEQ_MODELS, "model")
    config = _config(args, SEQ2SEQ_EPOCHS)
    languages = [x.strip() for x in args.languages.split(",")] if args.languages else list(LANGUAGES)
    train_size = args.train_size or (256 if args.quick else 4000)
    per_bucket = args.test_per_bucket or (16 if args.quick else 300)
    for name, value in (("--train-size", train_size), ("--test-per-bucket", per_bucket)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    try:
        task = make_date_task(
            num_train=train_size,
            num_test_per_bucket=per_bucket,
            train_max_length=args.train_max_length,
            languages=languages,
        )
    except ValueError as err:
        raise UserError(str(err)) from None
    if len(task.train) < config.batch_size:
        raise UserError(f"{len(task.train)} training pairs are fewer than one batch (--batch-size {config.batch_size})")
    return lambda: run_seq2seq_ablation(
        task,
        models=models,
        seeds=range(args.seeds),
        config=config,
        latency_rounds=2 if args.quick else args.latency_rounds,
        progress=_progress,
    )


def _custom(args: argparse.Namespace):
    from attnkit.cli.ablate_custom import custom_job

    return custom_job(args, _config(args, CUSTOM_EPOCHS), _progress)


def run(args: argparse.Namespace) -> int:
    import torch

    from attnkit.ablation.report import check_writable, planned_files
    from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS

    out = args.out or Path(f"ablation-{args.task}")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    alignment_models = []
    if args.task == "seq2seq":
        alignment_models = [m for m in _names(args.models, SEQ2SEQ_MODELS, "model") if m != "none"]
    check_out_dir(out)  # before any work: never train for minutes and then refuse to write
    try:
        check_writable(planned_files(out, alignment_models), overwrite=args.overwrite)
    except FileExistsError as err:
        raise UserError(str(err)) from None
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args, out)
    finally:  # in-process callers (tests, notebooks) get their thread count back
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, out: Path) -> int:
    import torch.distributed

    from attnkit.ablation.report import write_report
    from attnkit.ablation.train import init_distributed

    job = {"vision": _vision, "seq2seq": _seq2seq, "custom": _custom}[args.task](args)
    _, world = init_distributed()
    try:
        if args.batch_size % world:
            raise UserError(f"--batch-size {args.batch_size} is not a multiple of the {world} processes")
        try:
            result = job()
        except ValueError as err:
            raise UserError(str(err)) from None
        if result is not None:  # None: not the main process of a distributed run
            result.threshold = args.threshold / 100
            try:
                paths = write_report(result, out, overwrite=args.overwrite)
            except FileExistsError as err:
                raise UserError(str(err)) from None
            print(result.to_markdown())
            print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
        if world > 1:
            torch.distributed.barrier()  # the other ranks wait for rank 0's report
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()
    return 0


subcommand("ablate", "does attention help? train variants under one budget; report accuracy, cost, significance")(
    add_arguments, run
)
