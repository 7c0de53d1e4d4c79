"""Task (d) of the explanation benchmarks: which generation-attribution method to trust for the shipped
character-level decoder, and what computing it with the KV cache costs.

Part ``evaluate``: prompts are windows of the held-out topics of ``pydoc_data.topics`` (``--prompts`` of them,
``--prompt-chars`` characters each); the decoder continues each greedily for ``--steps`` characters, and the
explained token is the next one after that (the model's own greedy choice). Each method's attribution row for that
token is computed by :func:`attnkit.explain.generate_attribution` through the KV-cached steps, over all
``prompt-chars + steps`` earlier characters, and scored by :func:`attnkit.explain.evaluate` with the explained
token's softmax probability as the score and the unknown-character id as the deletion baseline: deletion and
insertion AUC (Petsiuk et al. 2018), AOPC comprehensiveness and sufficiency (DeYoung et al. 2020) and the cascading
randomisation check (Adebayo et al. 2018, top-down from ``lm_head`` to ``embed``). Also ``grad_input_contrastive``
(against the runner-up token, through the cache) and AttnLRP / CP-LRP (:func:`attnkit.explain.lrp`, one pass over
the whole sequence). Baselines: ``random`` (uniform scores) and ``recency`` (the most recent character first), the
trivial method a character model has to beat.

Part ``cost``: attributing every generated token of ``--cost-new`` tokens, with the KV cache (this library) versus
re-running the whole sequence for each token (what a per-token call of ``capture``/``relevance`` does); medians.

Usage::

    flock /tmp/attnkit-heavy.lock python benchmarks/generation_attribution.py --part evaluate
    flock /tmp/attnkit-heavy.lock python benchmarks/generation_attribution.py --part cost
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from attnkit.datasets import language_reference_text
from attnkit.explain import EvaluationTask, capture, evaluate, generate_attribution, lrp, rollout
from attnkit.models.char_decoder import UNK_ID, encode_chars, load_char_decoder

METHODS = ("raw", "rollout", "grad_input", "relevance")
TOP_DOWN = ("lm_head", "norm", "layers.3", "layers.2", "layers.1", "layers.0", "embed")


def prompts(count: int, chars: int) -> torch.Tensor:
    """``(count, chars)`` ids: windows of the test topics at evenly spaced offsets."""
    ids = torch.tensor(encode_chars(language_reference_text("test")), dtype=torch.long)
    starts = torch.linspace(0, len(ids) - chars - 1, count).long()
    return torch.stack([ids[s : s + chars] for s in starts.tolist()])


def attribution_method(name: str, prompt_chars: int):
    """``(model, x) -> (B, L)``: the attribution of the token after ``x``, the first ``prompt_chars`` of ``x`` as
    prompt and the rest fed as forced generated tokens through the KV cache."""

    def method(model, x):
        steps = x.shape[1] - prompt_chars
        res = generate_attribution(
            model, x[:, :prompt_chars], max_new_tokens=steps + 1, methods=name, forced_tokens=x[:, prompt_chars:]
        )
        return res[name][:, -1, : x.shape[1]]

    return method


def contrastive_method(prompt_chars: int):
    """Gradient x input of ``logit[explained] - logit[runner-up]`` (Yin & Neubig 2022), through the KV cache."""

    def method(model, x):
        steps = x.shape[1] - prompt_chars
        runner_up = next_logits(model, x).topk(2, -1).indices[:, 1]
        res = generate_attribution(
            model,
            x[:, :prompt_chars],
            max_new_tokens=steps + 1,
            methods="grad_input",
            forced_tokens=x[:, prompt_chars:],
            foil=runner_up,
        )
        return res["grad_input"][:, -1, : x.shape[1]]

    return method


def lrp_method(rule: str):
    """AttnLRP / CP-LRP (``attnkit.explain.lrp``) of the next-token logit: one forward and backward over the whole
    sequence (no KV cache: the LRP rules are applied by ``lrp`` around one call)."""

    def method(model, x):
        target = next_logits(model, x).argmax(-1)
        return lrp(
            model, {"input_ids": x}, lambda out: out[:, -1].gather(1, target[:, None])[:, 0], rule=rule
        ).relevance

    return method


def baseline_method(name: str):
    def method(model, x):
        if name == "recency":
            return torch.arange(1, x.shape[1] + 1, dtype=torch.float32).expand(x.shape[0], -1).clone()
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(0))

    return method


def next_logits(model, x):
    with torch.no_grad():
        return model(x)[:, -1]


def run_evaluate(args) -> dict:
    model = load_char_decoder()
    p = prompts(args.prompts, args.prompt_chars)
    with torch.no_grad():
        cont = generate_attribution(model, p, max_new_tokens=args.steps, methods="raw").sequences
    target = next_logits(model, cont).argmax(-1)
    task = EvaluationTask(
        model=model,
        x=cont,
        score_fn=next_logits,
        target=target,
        baseline=UNK_ID,
        randomize=list(TOP_DOWN),
        steps=args.deletion_steps,
    )
    methods = {m: attribution_method(m, args.prompt_chars) for m in METHODS}
    methods["grad_input_contrastive"] = contrastive_method(args.prompt_chars)
    methods.update({"attnlrp": lrp_method("attnlrp"), "cp-lrp": lrp_method("cp-lrp")})
    # the published rules (conserve=False) through the KV cache
    methods.update({f"{r}_cache": attribution_method(r, args.prompt_chars) for r in ("attnlrp", "cp-lrp")})
    methods.update({b: baseline_method(b) for b in ("recency", "random")})
    unknown = set(args.methods or ()) - set(methods)
    if unknown:
        raise SystemExit(f"--methods: unknown {sorted(unknown)}; valid: {', '.join(methods)}")
    table, seconds = {}, {}
    for name, method in methods.items():
        if args.methods and name not in args.methods:
            continue
        t0 = time.perf_counter()
        table[name] = evaluate(task, {name: method})[name]
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(table[name]), f"{seconds[name]} s", flush=True)
    return {
        "table": table,
        "seconds": seconds,
        "explained_probability": float(next_logits(model, cont).softmax(-1).max(-1).values.mean()),
    }


def _full_rerun(model, seq, prompt_len, method):
    """The naive way: one whole-sequence forward (and backward) per generated token."""
    for length in range(prompt_len, seq.shape[1]):
        x = seq[:, :length]
        if method == "rollout":
            with torch.no_grad(), capture(model) as rec:
                model(x)
            rollout(rec.maps)[:, -1]
        else:
            emb = model.get_input_embeddings()(x).detach().requires_grad_(True)
            logits = model(inputs_embeds=emb)[:, -1]
            (grad,) = torch.autograd.grad(logits.gather(1, seq[:, length, None]).sum(), emb)
            (grad * emb).sum(-1)


def run_cost(args) -> dict:
    model = load_char_decoder()
    p = prompts(args.cost_batch, args.prompt_chars)
    seq = generate_attribution(model, p, max_new_tokens=args.cost_new, methods="raw").sequences
    rows = {}
    for method in ("rollout", "grad_input"):
        cached, full = [], []
        for _ in range(args.repeats):  # interleaved
            t0 = time.perf_counter()
            generate_attribution(
                model, p, max_new_tokens=args.cost_new, methods=method, forced_tokens=seq[:, -args.cost_new :]
            )
            cached.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _full_rerun(model, seq, args.prompt_chars, method)
            full.append(time.perf_counter() - t0)
        rows[method] = {
            "kv_cache_s": round(statistics.median(cached), 3),
            "full_rerun_s": round(statistics.median(full), 3),
            "ratio": round(statistics.median(full) / statistics.median(cached), 2),
        }
        print(method, rows[method], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("evaluate", "cost"), required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-chars", type=int, default=48)
    parser.add_argument("--steps", type=int, default=16, help="greedy characters before the explained one")
    parser.add_argument("--deletion-steps", type=int, default=16)
    parser.add_argument("--cost-batch", type=int, default=8)
    parser.add_argument("--cost-new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=None, help="evaluate only these methods (default all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"start {time.strftime('%H:%M:%S', time.gmtime())} load {os.getloadavg()}", flush=True)
    result = run_evaluate(args) if args.part == "evaluate" else run_cost(args)
    print(f"end {time.strftime('%H:%M:%S', time.gmtime())} load {os.getloadavg()}")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
