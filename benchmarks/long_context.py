"""Long-context attention on CPU: attnkit's blocksparse and tiled backends vs dense SDPA, FlexAttention and math.

Question: how much do block-sparse layouts and the O(L)-memory tiled kernel save at long sequence lengths?

Cases (H = 8, D = 64, B = 1; float32 and bfloat16; L = 4096, 16384, 32768):
  * window  -- sliding window of 512 keys (``window_size=(256, 256)``), Longformer's local attention;
  * causal  -- causal mask;
  * bigbird -- BigBird ITC layout (block 64, 3 window + 2 global + 3 random blocks).
Peers, all run in this process on the same tensors: dense ``F.scaled_dot_product_attention`` with the equivalent
boolean mask (up to ``--max-dense-len``), ``torch.nn.attention.flex_attention`` compiled with ``torch.compile``
(compile time reported separately), attnkit's ``math`` backend while its scores fit in ``--math-budget-gib``.
Reported: median milliseconds, ratio to dense SDPA and to FlexAttention, first-call time (layout build
included), the fraction of dense FLOPs actually computed (visited blocks · 4 · block² · D · H vs 4 · L² · D · H),
and for the tiled backend with a ``score_mod`` relative bias at the largest L: peak extra resident memory vs
the bytes of Q, K, V and the output, and its throughput relative to SDPA at L = 8192.

Usage:
    python benchmarks/long_context.py --quick        # smoke run, seconds
    python benchmarks/long_context.py                # full run (quiet machine; minutes)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import sparse

H, D = 8, 64


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call ms, median of ``repeats`` further calls ms)."""
    t0 = time.perf_counter()
    fn()
    first = (time.perf_counter() - t0) * 1e3
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t0) * 1e3)
    return first, statistics.median(runs)


def layout(case: str, L: int) -> sparse.BlockMask:
    if case == "window":
        return sparse.sliding_window(L, window_size=256, block_size=128)
    if case == "causal":
        return sparse.causal(L, block_size=128)
    return sparse.bigbird(L, block_size=64, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3)


def flex_mask_mod(case: str, L: int, mask: sparse.BlockMask):
    if case == "window":
        return lambda b, h, q, k: (q - k).abs() <= 256
    if case == "causal":
        return lambda b, h, q, k: k <= q
    table = mask.visited
    return lambda b, h, q, k: table[q // 64, k // 64]


def run_case(case, L, dtype, args, rows):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, L, D, generator=g).to(dtype) for _ in range(3))
    t0 = time.perf_counter()
    mask = layout(case, L)
    build_ms = (time.perf_counter() - t0) * 1e3
    row = {"case": case, "L": L, "dtype": str(dtype).replace("torch.", ""), "density": mask.density()}
    first, med = timed(lambda: attnkit.attention(q, k, v, block_mask=mask, backend="blocksparse"), args.repeats)
    row["blocksparse"], row["bs_first"] = med, first + build_ms
    if case in ("window", "causal"):
        kw = {"window_size": 256} if case == "window" else {"is_causal": True}
        row["tiled"] = timed(lambda: attnkit.attention(q, k, v, backend="tiled", **kw), args.repeats)[1]
    if args.max_dense_len >= L:
        dense = mask.to_dense()
        row["sdpa_mask"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), args.repeats)[1]
        del dense
    if args.math_budget_gib * 2**30 >= 4 * H * L * L:
        row["math"] = timed(lambda: attnkit.attention(q, k, v, block_mask=mask, backend="math"), 1)[1]
    if args.flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            t0 = time.perf_counter()
            fbm = create_block_mask(flex_mask_mod(case, L, mask), None, None, L, L, device="cpu")
            compiled = torch.compile(flex_attention)
            compiled(q, k, v, block_mask=fbm)
            row["flex_compile_s"] = time.perf_counter() - t0
            row["flex"] = timed(lambda: compiled(q, k, v, block_mask=fbm), args.repeats)[1]
        except Exception as exc:  # report, do not hide: FlexAttention on CPU depends on the torch build
            row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    rows.append(row)
    print(format_row(row), flush=True)


def format_row(r) -> str:
    def ms(name):
        return f"{r[name]:.1f}" if name in r else "-"

    def ratio(name):
        return f"{r[name] / r['blocksparse']:.2f}x" if name in r else "-"

    flex = ms("flex") if "flex_error" not in r else "error"
    compile_s = f"{r['flex_compile_s']:.1f}" if "flex_compile_s" in r else "-"
    return (
        f"| {r['case']} | {r['L']} | {r['dtype']} | {r['density']:.4f} | {r['blocksparse']:.1f} | "
        f"{r['bs_first']:.0f} | "
        f"{ms('tiled')} | {ms('sdpa_mask')} | {ratio('sdpa_mask')} | {flex} | {ratio('flex')} | {compile_s} | "
        f"{ms('math')} |"
    )


HEADER = (
    "| case | L | dtype | FLOPs vs dense | blocksparse ms | first call ms | tiled ms | SDPA+mask ms | SDPA/bs | "
    "Flex ms | Flex/bs | Flex compile s | math ms |\n|" + "---|" * 13
)


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tiled_memory(L: int, ref_len: int, repeats: int) -> None:
    """Peak extra RSS of the tiled backend with a score_mod at ``L``; throughput vs SDPA at ``ref_len``."""
    slopes = torch.linspace(0.01, 0.1, H)

    def score_mod(s, b, h, qi, ki):
        return s - slopes[h] * (qi - ki).abs()

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    out_bytes = q.numel() * q.element_size()
    qkvo = 4 * out_bytes
    base = _current_rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (Linux)
        reset = True
    except OSError:
        reset = False
    t0 = time.perf_counter()
    attnkit.attention(q, k, v, score_mod=score_mod, backend="tiled")
    secs = time.perf_counter() - t0
    extra = _peak_rss_bytes() - base
    note = "" if reset else " (VmHWM could not be reset: upper bound)"
    print(
        f"\ntiled + score_mod at L={L}: {secs:.2f} s, peak extra RSS {extra / 2**20:.0f} MiB = "
        f"{extra / qkvo:.2f}x the {qkvo / 2**20:.0f} MiB of Q, K, V and the output{note}; "
        f"math would need {4 * H * L * L / 2**30:.2f} GiB for the float32 scores alone"
    )
    q, k, v = (torch.randn(1, H, ref_len, D, generator=g) for _ in range(3))
    tiled_ms = timed(lambda: attnkit.attention(q, k, v, score_mod=score_mod, backend="tiled"), repeats)[1]
    sdpa_ms = timed(lambda: F.scaled_dot_product_attention(q, k, v), repeats)[1]
    print(
        f"tiled + score_mod at L={ref_len}: {tiled_ms:.0f} ms vs dense SDPA (no bias) {sdpa_ms:.0f} ms: "
        f"{sdpa_ms / tiled_ms:.2f}x SDPA's throughput"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: L=1024, float32, 1 repeat, no FlexAttention")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=["window", "causal", "bigbird"])
    p.add_argument("--max-dense-len", type=int, default=16384, help="largest L for dense SDPA with a mask")
    p.add_argument("--math-budget-gib", type=float, default=2.0, help="run math while its scores fit in this")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention")
    p.add_argument("--memory-len", type=int, default=32768, help="L of the tiled score_mod memory check")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.dtypes, args.repeats, args.flex, args.memory_len = [1024], ["float32"], 1, False, 2048
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, H={H}, D={D}, B=1\n")
    print(HEADER)
    rows: list[dict] = []
    for dtype in args.dtypes:
        for L in args.lengths:
            for case in args.cases:
                run_case(case, L, getattr(torch, dtype), args, rows)
    tiled_memory(args.memory_len, 1024 if args.quick else 8192, args.repeats)


if __name__ == "__main__":
    main()
