"""Each attnkit backend against a direct torch SDPA call, in the same run (medians, throughput ratios).

Cases (issue 2): dense and causal, float32 and bfloat16, L = 512, 2048, 8192, B = 1, H = 8, D = 64.
Target: ``backend="auto"`` at >= 0.97x the throughput of direct SDPA where SDPA serves the call.

    python benchmarks/attention.py            # full run (several minutes on 2 cores)
    python benchmarks/attention.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import platform

import torch

from attnkit.benchmark import AttentionCase, format_table, run_attention_benchmark


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small lengths, short budget")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    args = parser.parse_args(argv)
    lengths = args.lengths or ([128, 512] if args.quick else [512, 2048, 8192])
    cases = [
        AttentionCase(length=L, dtype=dtype, mask=mask)
        for dtype in (torch.float32, torch.bfloat16)
        for mask in ("dense", "causal")
        for L in lengths
    ]
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
    )
    results = run_attention_benchmark(
        cases, budget_s=0.5 if args.quick else 6.0, progress=lambda s: print(f"... {s}", flush=True)
    )
    print(format_table(results))


if __name__ == "__main__":
    main()
