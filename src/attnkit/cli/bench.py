"""``attnkit bench``: the backend benchmark table for this machine (the numbers ``attnkit demo`` shows)."""

from __future__ import annotations

import argparse

from attnkit.cli.registry import UserError, subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="short lengths and budget (seconds, not minutes)")
    parser.add_argument(
        "--length", type=int, default=None, help="sequence length for the long case (default 4096; quick: 2048)"
    )


def cases(quick: bool, length: int | None = None):
    """The demo/bench cases: dense, causal and sliding window at one long length, float32."""
    from attnkit.benchmark import AttentionCase

    length = (2048 if quick else 4096) if length is None else length
    if length < 16:
        raise UserError(f"--length must be at least 16, got {length}")
    return [AttentionCase(length=length, mask=m, window=min(256, length // 4)) for m in ("dense", "causal", "window")]


def run(args: argparse.Namespace) -> int:
    from attnkit.benchmark import format_table, run_attention_benchmark

    results = run_attention_benchmark(
        cases(args.quick, args.length),
        budget_s=0.5 if args.quick else 3.0,
        max_math_length=1024,
        progress=_progress(),
    )
    print(format_table(results))
    return 0


def _progress():
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the demo extra; without it, plain lines
        return lambda label: print(f"... {label}", flush=True)
    return lambda label: tqdm.write(f"... {label}")


subcommand("bench", "time attention backends against torch SDPA on this machine")(add_arguments, run)
