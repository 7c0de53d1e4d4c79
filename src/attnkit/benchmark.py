"""Timing attention backends against torch SDPA in one run: interleaved repetitions, medians and ratios.

Used by ``benchmarks/attention.py`` and the ``attnkit bench`` command, so both print the same numbers.
Each case runs every contender once per round, round after round (interleaved), so drift in the machine's
speed affects all contenders alike; the reported time is the median over rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import attnkit

__all__ = ["AttentionCase", "Timing", "format_table", "interleaved_medians", "run_attention_benchmark"]


@dataclass(frozen=True)
class AttentionCase:
    """One benchmark input: ``(batch, num_heads, length, head_dim)`` query = key = value shapes and a mask."""

    length: int
    dtype: torch.dtype = torch.float32
    mask: str = "dense"  # "dense" | "causal" | "window"
    batch: int = 1
    num_heads: int = 8
    head_dim: int = 64
    window: int = 256

    @property
    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        mask = f"window ±{self.window}" if self.mask == "window" else self.mask
        return f"L={self.length} {dtype} {mask}"


@dataclass(frozen=True)
class Timing:
    """Median seconds of one contender on one case, and its throughput relative to the SDPA baseline."""

    case: str
    contender: str
    median_s: float
    rounds: int
    ratio_vs_sdpa: float  # baseline time / this time: > 1 is faster than direct SDPA


def interleaved_medians(contenders: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict:
    """Median wall time (seconds) of each callable, run round-robin ``rounds`` times after ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def _inputs(case: AttentionCase, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (case.batch, case.num_heads, case.length, case.head_dim)
    return [torch.randn(shape, generator=g).to(case.dtype) for _ in range(3)]


def _contenders(case: AttentionCase, max_math_length: int) -> dict[str, Callable[[], object]]:
    q, k, v = _inputs(case)
    kwargs: dict = {}
    sdpa_kwargs: dict = {}
    if case.mask == "causal":
        kwargs["is_causal"] = sdpa_kwargs["is_causal"] = True
    elif case.mask == "window":
        kwargs["window_size"] = (case.window, case.window)
        sdpa_kwargs["attn_mask"] = attnkit.masks.sliding_window(case.length, case.length, case.window)
    contenders = {"torch SDPA (direct)": lambda: F.scaled_dot_product_attention(q, k, v, **sdpa_kwargs)}
    contenders["attnkit auto"] = lambda: attnkit.attention(q, k, v, **kwargs)
    for name in attnkit.backends.available():
        if name == "math" and case.length > max_math_length:
            continue
        try:
            attnkit.backends.select(q, k, v, backend=name, **kwargs)
        except ValueError:
            continue
        contenders[f"attnkit {name}"] = lambda name=name: attnkit.attention(q, k, v, backend=name, **kwargs)
    return contenders


def run_attention_benchmark(
    cases: Sequence[AttentionCase],
    *,
    max_math_length: int = 2048,
    budget_s: float = 4.0,
    max_rounds: int = 30,
    progress: Callable[[str], None] | None = None,
) -> list[Timing]:
    """Time every backend that serves each case against a direct ``F.scaled_dot_product_attention`` call.

    Args:
        cases: the inputs to time.
        max_math_length: skip the ``math`` backend above this length (it materializes ``H·L²`` scores).
        budget_s: rough wall-time budget per case, which sets the number of rounds (3 to ``max_rounds``).
        max_rounds: upper bound on rounds per case.
        progress: called with each case's label before it runs.

    Returns:
        one :class:`Timing` per (case, contender).
    """
    results: list[Timing] = []
    with torch.inference_mode():
        for case in cases:
            if progress is not None:
                progress(case.label)
            contenders = _contenders(case, max_math_length)
            start = time.perf_counter()
            for fn in contenders.values():
                fn()
            per_round = time.perf_counter() - start
            rounds = int(max(3, min(max_rounds, budget_s / max(per_round, 1e-6))))
            medians = interleaved_medians(contenders, rounds, warmup=0)
            base = medians["torch SDPA (direct)"]
            for name, t in medians.items():
                results.append(Timing(case.label, name, t, rounds, base / t))
    return results


def format_table(results: Sequence[Timing]) -> str:
    """A Markdown table: case, contender, median ms, throughput ratio vs direct SDPA."""
    lines = [
        "| case | contender | median ms | vs SDPA (throughput) | rounds |",
        "|---|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(f"| {r.case} | {r.contender} | {r.median_s * 1e3:.2f} | {r.ratio_vs_sdpa:.3f}x | {r.rounds} |")
    return "\n".join(lines)
