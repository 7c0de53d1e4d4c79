"""Hugging Face models on attnkit (``attn_implementation="attnkit"``) vs transformers' own sdpa and eager, on CPU.

Questions: how much faster and smaller is a long prompt's prefill when a sliding-window model runs on attnkit, what
does a soft-capped model (which HF can only run eagerly) cost, and does decoding keep up with HF's sdpa?

Cases (random weights, float32, batch 1; each measurement in its own subprocess, one at a time, so that peak
memory is that run's alone):
  * ``mistral``: Mistral-shaped, 4 layers, hidden 1024, 16 heads, 4 KV heads (head_dim 64), MLP 2816, sliding
    window 4096; one forward over an L-token prompt (``--mistral-len``, default 32768) with attnkit, HF sdpa
    (which builds a dense windowed boolean mask) and eager where its (16, L, L) float32 scores fit the budget.
  * ``gemma2``: Gemma 2-shaped, 4 layers alternating sliding window 4096 / global, hidden 1024, 8 heads, 4 KV heads
    (head_dim 128), MLP 2816, attention logit softcap 50; one forward at ``--gemma-eager-len`` (default 8192) and
    ``--gemma-len`` (default 16384) with attnkit and eager where its scores fit (HF refuses sdpa for softcap).
  * ``decode``: the Mistral-shaped model; a ``--decode-context``-token prompt (default 4096) is prefilled into a
    DynamicCache, then ``--decode-tokens`` greedy tokens (default 32) are generated one forward at a time; tokens
    per second of the decoding loop only, attnkit vs HF sdpa.
Reported: wall time (median of ``--repeats`` forwards after one warm-up at 1024 tokens; the decode loop once),
peak extra resident memory over the process's RSS after loading the model (``VmHWM - VmRSS``, Linux), and ratios.

Usage:
    python benchmarks/hf.py --quick          # smoke run, a minute
    python benchmarks/hf.py                  # full run (minutes; run it alone on the machine)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

WINDOW = 4096


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS (Linux)


def build(case: str, impl: str):
    import transformers as tf

    common = dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=4,
        num_key_value_heads=4,
        max_position_embeddings=65536,
        sliding_window=WINDOW,
    )
    if case == "gemma2":
        cfg = tf.Gemma2Config(
            **common, num_attention_heads=8, head_dim=128, query_pre_attn_scalar=128, attn_logit_softcapping=50.0
        )
        model_cls = tf.Gemma2ForCausalLM
    else:
        cfg = tf.MistralConfig(**common, num_attention_heads=16, head_dim=64)
        model_cls = tf.MistralForCausalLM
    if impl == "attnkit":
        from attnkit.integrations.transformers import register

        register()
    torch.manual_seed(0)
    cfg._attn_implementation = impl
    return model_cls(cfg).eval()


@torch.inference_mode()
def prefill(case: str, impl: str, length: int, repeats: int) -> dict:
    model = build(case, impl)
    ids = torch.randint(0, 32000, (1, length), generator=torch.Generator().manual_seed(0))
    model.model(input_ids=ids[:, :1024])  # warm-up: allocator, layouts of the short length
    base = _rss("VmRSS")
    _reset_peak()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.model(input_ids=ids)
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "runs": len(times), "peak_extra_gib": (_rss("VmHWM") - base) / 2**30}


@torch.inference_mode()
def decode(impl: str, context: int, tokens: int) -> dict:
    from transformers import DynamicCache

    model = build("mistral", impl)
    ids = torch.randint(0, 32000, (1, context), generator=torch.Generator().manual_seed(0))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True)
    nxt = out.logits[:, -1:].argmax(-1)
    generated = []
    t0 = time.perf_counter()
    for _ in range(tokens):
        out = model(input_ids=nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        generated.append(int(nxt))
    secs = time.perf_counter() - t0
    return {"tokens_per_s": tokens / secs, "seconds": secs, "tokens": generated}


def eager_fits(heads: int, length: int, budget_gib: float) -> bool:
    """Eager keeps a layer's float32 scores and probabilities, (heads, L, L) each, plus the float mask (L, L)."""
    return (2 * heads + 1) * 4 * length * length / 2**30 <= budget_gib


def run_one(argv: list[str]) -> dict:
    """Run one measurement in a fresh interpreter (peak memory is then that measurement's alone)."""
    cmd = [sys.executable, __file__, "--worker", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short prompts, a smoke run")
    p.add_argument("--mistral-len", type=int, default=32768)
    p.add_argument("--gemma-len", type=int, default=16384)
    p.add_argument("--gemma-eager-len", type=int, default=8192, help="a length where eager's scores fit too")
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=1, help="forwards per prefill measurement (median)")
    p.add_argument("--eager-budget-gib", type=float, default=12.0, help="skip eager when its scores need more")
    p.add_argument("--sdpa-budget-len", type=int, default=32768, help="longest prompt for HF sdpa")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=("mistral", "gemma2", "decode"), default=None)
    p.add_argument("--worker", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        kind, impl, *rest = args.worker
        if kind == "decode":
            result = decode(impl, int(rest[0]), int(rest[1]))
        else:
            result = prefill(kind, impl, int(rest[0]), int(rest[1]))
        print(json.dumps(result))
        return
    if args.quick:
        args.mistral_len, args.gemma_len, args.gemma_eager_len = 2048, 2048, 1024
        args.decode_context, args.decode_tokens = 512, 8
    print(f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| case | L | implementation | time s | peak extra memory GiB | time vs attnkit |", flush=True)
    print("|---|---|---|---|---|---|", flush=True)
    if args.only in (None, "mistral"):
        L = args.mistral_len
        plan = [("attnkit", args.repeats), ("sdpa", 1) if args.sdpa_budget_len >= L else None]
        plan.append(("eager", 1) if eager_fits(16, L, args.eager_budget_gib) else None)
        _table("Mistral-shaped, window 4096", "mistral", L, plan)
    if args.only in (None, "gemma2"):
        for L in sorted({args.gemma_eager_len, args.gemma_len}):
            plan = [("attnkit", args.repeats), ("eager", 1) if eager_fits(8, L, args.eager_budget_gib) else None]
            _table("Gemma 2-shaped, softcap 50", "gemma2", L, plan)
    if args.only in (None, "decode"):
        n, ctx = args.decode_tokens, args.decode_context
        dec = {impl: run_one(["decode", impl, str(ctx), str(n)]) for impl in ("attnkit", "sdpa")}
        print(f"\nGreedy decoding, Mistral-shaped, {ctx}-token context, {n} tokens:")
        for impl, r in dec.items():
            print(f"  {impl}: {r.get('tokens_per_s', float('nan')):.2f} tokens/s {r.get('error', '')}")
        if all("tokens" in r for r in dec.values()):
            same = dec["attnkit"]["tokens"] == dec["sdpa"]["tokens"]
            ratio = dec["sdpa"]["tokens_per_s"] / dec["attnkit"]["tokens_per_s"]
            print(f"  sdpa / attnkit tokens/s: {ratio:.2f}x; same greedy tokens: {same}")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


def _table(title: str, case: str, L: int, plan: list) -> None:
    """Measure each (implementation, repeats) of ``plan`` (``None``: does not fit) and print its row at once."""
    ours = None
    skipped = {"mistral": ["attnkit", "sdpa", "eager"], "gemma2": ["attnkit", "eager"]}[case]
    for item, impl in zip(plan, skipped):
        if item is None:
            print(f"| {title} | {L} | {impl} | not run: its dense scores/mask exceed the budget | - | - |", flush=True)
            continue
        r = run_one([case, impl, str(L), str(item[1])])
        if "error" in r:
            print(f"| {title} | {L} | {impl} | failed: {r['error']} | - | - |", flush=True)
            continue
        ours = r["seconds"] if impl == "attnkit" else ours
        ratio = f"{r['seconds'] / ours:.2f}x" if ours else "-"
        line = f"| {title} | {L} | {impl} | {r['seconds']:.2f} | {r['peak_extra_gib']:.2f} | {ratio} |"
        print(line, flush=True)


if __name__ == "__main__":
    main()
