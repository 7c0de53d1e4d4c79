"""Long-context attention on CPU: attnkit's block-sparse and tiled backends against their peers, in one run.

Question: how fast are attnkit's long-sequence paths, quiet and on a shared machine, forward and training?

Parts (``--parts``; H = 8, D = 64, B = 1):
  * forward -- sliding windows ±256 and ±512 (``attnkit.attention(q, k, v, window_size=w)``, what ``auto``
    picks), causal (``backend="tiled"``) and BigBird (block 64, 3 window + 2 global + 3 random blocks,
    ``block_mask=``) at ``--lengths`` and ``--dtypes``; peers on the same tensors: SDPA with the equivalent
    boolean mask (up to ``--max-dense-len``) and ``torch.compile(flex_attention)`` with the same block mask
    (compile time reported separately, steady state compared).
  * train -- forward + backward of the window ±256 call at L = 8192 (``--short-len``) against SDPA with the mask
    (FlexAttention has no CPU backward).
  * mods -- what SDPA cannot do at L = 8192: causal with a ``score_mod`` (ALiBi-like bias) and causal with
    ``softcap=30`` on ``auto`` (tiled), against SDPA causal without them (the speed bar).
  * memory -- peak extra resident memory of ``softcap`` and ``score_mod`` calls at ``--memory-len`` against the
    bytes of Q, K, V and the output.
``--contended`` starts a second process that keeps one core busy (a Python busy loop) for the whole run and
stops it at the end: the situation of a shared machine, a DataLoader worker or a second job.
Reported: medians of ``--repeats`` calls after one warm-up call (whose time is the "first call"), ratios
peer / attnkit (> 1: attnkit faster), and ``os.getloadavg()`` at start and end.

Usage:
    python benchmarks/long_context.py --quick                      # smoke run, seconds
    python benchmarks/long_context.py --parts forward --lengths 16384 --dtypes float32
    python benchmarks/long_context.py --parts forward train --contended --no-flex
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import attnkit
from attnkit import sparse

H, D = 8, 64
WINDOWS = {"window256": 256, "window512": 512}


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


def _inputs(L: int, dtype, requires_grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, L, D, generator=g).to(dtype).requires_grad_(requires_grad) for _ in range(3)]


def _case(case: str, L: int):
    """``(attnkit kwargs, dense bool mask builder, flex mask_mod)`` of a case."""
    if case in WINDOWS:
        w = WINDOWS[case]
        return (
            {"window_size": (w, w)},
            lambda: (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= w,
            lambda b, h, q, k: (q - k).abs() <= w,
        )
    if case == "causal":
        return {"is_causal": True, "backend": "tiled"}, None, lambda b, h, q, k: k <= q
    mask = sparse.bigbird(L, block_size=64, num_window_blocks=3, num_global_blocks=2, num_random_blocks=3)
    table = mask.visited
    return {"block_mask": mask}, mask.to_dense, lambda b, h, q, k: table[q // 64, k // 64]


def forward_row(case: str, L: int, dtype, args) -> dict:
    q, k, v = _inputs(L, dtype)
    kwargs, dense_fn, flex_mod = _case(case, L)
    row = {"case": case, "L": L, "dtype": str(dtype).replace("torch.", "")}
    with torch.no_grad():
        row["first"], row["attnkit"] = timed(lambda: attnkit.attention(q, k, v, **kwargs), args.repeats)
        if case == "causal":
            row["sdpa"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), args.repeats)[1]
        elif args.max_dense_len >= L:
            dense = dense_fn()
            row["sdpa"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=dense), args.repeats)[1]
            del dense
        if args.flex:
            try:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention

                t0 = time.perf_counter()
                fbm = create_block_mask(flex_mod, None, None, L, L, device="cpu")
                compiled = torch.compile(flex_attention)
                compiled(q, k, v, block_mask=fbm)
                row["flex_compile_s"] = time.perf_counter() - t0
                row["flex"] = timed(lambda: compiled(q, k, v, block_mask=fbm), args.repeats)[1]
            except Exception as exc:  # report, do not hide: FlexAttention on CPU depends on the torch build
                row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:80]}"
    return row


def _ms(r, name):
    return f"{r[name]:.0f}" if name in r else "-"


def _ratio(r, name):
    return f"{r[name] / r['attnkit']:.2f}x" if name in r else "-"


FORWARD_HEADER = (
    "| case | L | dtype | attnkit ms | first call ms | SDPA ms | SDPA/attnkit | Flex ms | Flex/attnkit | "
    "Flex compile s |\n|" + "---|" * 10
)


def format_forward(r) -> str:
    flex = _ms(r, "flex") if "flex_error" not in r else "error"
    compile_s = f"{r['flex_compile_s']:.1f}" if "flex_compile_s" in r else "-"
    return (
        f"| {r['case']} | {r['L']} | {r['dtype']} | {r['attnkit']:.0f} | {r['first']:.0f} | {_ms(r, 'sdpa')} | "
        f"{_ratio(r, 'sdpa')} | {flex} | {_ratio(r, 'flex')} | {compile_s} |"
    )


def train_rows(args) -> None:
    """Forward + backward of the window ±256 call against SDPA with the boolean mask."""
    L = args.short_len
    print("\n| fwd+bwd, window ±256 | L | dtype | attnkit ms | SDPA+mask ms | SDPA/attnkit |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        q, k, v = _inputs(L, getattr(torch, name), requires_grad=True)
        dense = (torch.arange(L)[:, None] - torch.arange(L)[None, :]).abs() <= 256

        def ours_step(q=q, k=k, v=v):
            attnkit.attention(q, k, v, window_size=(256, 256)).sum().backward()

        def sdpa_step(q=q, k=k, v=v, dense=dense):
            F.scaled_dot_product_attention(q, k, v, attn_mask=dense).sum().backward()

        ours, sdpa = timed(ours_step, args.repeats)[1], timed(sdpa_step, args.repeats)[1]
        print(f"| window256 | {L} | {name} | {ours:.0f} | {sdpa:.0f} | {sdpa / ours:.2f}x |", flush=True)


def _alibi_mod():
    slopes = torch.linspace(0.01, 0.1, H)

    def score_mod(s, b, h, qi, ki):
        return s - slopes[h] * (qi - ki).abs()

    return score_mod


def _softcap_mod(cap: float):
    def score_mod(s, b, h, qi, ki):
        return torch.tanh(s / cap) * cap

    return score_mod


def _flex_causal(q, k, v, score_mod, repeats: int) -> str:
    """Steady-state ms of compiled FlexAttention, causal block mask plus ``score_mod`` (or the error)."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        L = q.shape[-2]
        torch._dynamo.reset()  # a second score_mod in one process otherwise fails to lower (torch 2.13, CPU)
        fbm = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, L, L, device="cpu")
        compiled = torch.compile(flex_attention)
        return f"{timed(lambda: compiled(q, k, v, score_mod=score_mod, block_mask=fbm), repeats)[1]:.0f}"
    except Exception as exc:  # report, do not hide: FlexAttention on CPU depends on the torch build
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:60]}"


def mods_rows(args) -> None:
    """Causal calls SDPA cannot serve (score_mod, softcap) against SDPA causal without them (the speed bar) and
    compiled FlexAttention with the same mod (the peer that can serve them)."""
    L = args.short_len
    print(
        f"\n| call, L={L}, causal | dtype | attnkit ms | SDPA causal (no mod) ms | attnkit speed / SDPA | "
        "Flex (same mod) ms | Flex/attnkit |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        q, k, v = _inputs(L, getattr(torch, name))
        calls = (
            ("score_mod (ALiBi-like)", {"score_mod": _alibi_mod()}, _alibi_mod()),
            ("softcap=30", {"softcap": 30.0}, _softcap_mod(30.0)),
        )

        def sdpa_call(q=q, k=k, v=v):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)

        with torch.no_grad():
            sdpa = timed(sdpa_call, args.repeats)[1]
            for label, extra, flex_mod in calls:
                backend = attnkit.backends.select(q, k, v, is_causal=True, **extra).backend

                def ours_call(q=q, k=k, v=v, extra=extra):
                    attnkit.attention(q, k, v, is_causal=True, **extra)

                ours = timed(ours_call, args.repeats)[1]
                flex = _flex_causal(q, k, v, flex_mod, args.repeats) if args.flex else "-"
                ratio = f"{float(flex) / ours:.2f}x" if flex.replace(".", "").isdigit() else "-"
                cells = f"{ours:.0f} | {sdpa:.0f} | {sdpa / ours:.2f}x | {flex} | {ratio}"
                print(f"| {label} ({backend}) | {name} | {cells} |", flush=True)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def memory_rows(L: int) -> None:
    """Peak extra RSS of causal softcap / score_mod calls at ``L`` vs the bytes of Q, K, V and the output."""
    q, k, v = _inputs(L, torch.float32, seed=1)
    qkvo = 4 * q.numel() * q.element_size()
    print(f"\n| call, L={L}, float32 | backend | s | peak extra RSS MiB | vs Q+K+V+out ({qkvo >> 20} MiB) |")
    print("|---|---|---|---|---|")
    for label, extra in (("softcap=30", {"softcap": 30.0}), ("score_mod (ALiBi-like)", {"score_mod": _alibi_mod()})):
        backend = attnkit.backends.select(q, k, v, is_causal=True, **extra).backend
        base = _rss("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (Linux)
        except OSError:
            pass
        t0 = time.perf_counter()
        with torch.no_grad():
            out = attnkit.attention(q, k, v, is_causal=True, **extra)
        secs = time.perf_counter() - t0
        peak = _rss("VmHWM:") - base - out.numel() * out.element_size()
        print(f"| {label} | {backend} | {secs:.1f} | {peak / 2**20:.0f} | {peak / qkvo:.2f}x |", flush=True)
        del out


class BusyCore:
    """A second process that keeps one core busy while the context is open."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: L=1024, float32, 1 repeat, no FlexAttention")
    p.add_argument("--parts", nargs="+", default=["forward", "train", "mods", "memory"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lengths", type=int, nargs="+", default=[16384])
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--cases", nargs="+", default=["window256", "window512", "causal", "bigbird"])
    p.add_argument("--max-dense-len", type=int, default=16384, help="largest L for dense SDPA with a mask")
    p.add_argument("--no-flex", dest="flex", action="store_false", help="skip FlexAttention")
    p.add_argument("--memory-len", type=int, default=32768, help="L of the memory part")
    p.add_argument("--short-len", type=int, default=8192, help="L of the train and mods parts")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--contended", action="store_true", help="keep one core busy with a second process")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.dtypes, args.repeats, args.flex = [1024], ["float32"], 1, False
        args.memory_len, args.short_len = 2048, 1024
    if args.threads:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, H={H}, D={D}, B=1, "
        f"{'one core kept busy by a second process' if args.contended else 'no extra load'}, load {load0:.2f}\n"
    )
    busy = BusyCore() if args.contended else None
    if busy:
        busy.__enter__()
    try:
        if "forward" in args.parts:
            print(FORWARD_HEADER)
            for dtype in args.dtypes:
                for L in args.lengths:
                    for case in args.cases:
                        print(format_forward(forward_row(case, L, getattr(torch, dtype), args)), flush=True)
        if "train" in args.parts:
            train_rows(args)
        if "mods" in args.parts:
            mods_rows(args)
        if "memory" in args.parts:
            memory_rows(args.memory_len)
    finally:
        if busy:
            busy.__exit__(None, None, None)
    print(f"\nload average (1 min): {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
