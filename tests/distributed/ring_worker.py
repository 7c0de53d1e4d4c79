"""One rank of the context-parallel tests: ``python ring_worker.py RANK WORLD PORT OUT_DIR``.

Runs every case of ``ring_cases`` in both layouts with ``attnkit.distributed.ring_attention`` on this rank's
slices and saves the slices of output, lse and gradients to ``OUT_DIR/rank{RANK}.pt`` for the test to check.
"""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import ring_cases

from attnkit.distributed import ring_attention, shard


def run(case: dict, layout: str, dtype) -> dict:
    q, k, v, g_out, g_lse, opts = ring_cases.build(case, dtype)
    q, k, v = (shard(t, -2, layout).requires_grad_(True) for t in (q, k, v))
    if "sinks" in opts:
        opts["sinks"].requires_grad_(True)
    res = ring_attention(q, k, v, layout=layout, return_lse=True, **opts)
    loss = (res.output.double() * shard(g_out, -2, layout)).sum()
    if g_lse is not None:
        loss = loss + (res.lse.double() * shard(g_lse, -1, layout)).sum()
    loss.backward()
    result = {"out": res.output.detach(), "lse": res.lse.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if "sinks" in opts:  # each rank's gradient covers its own rows: the sum is the full gradient
        dist.all_reduce(opts["sinks"].grad)
        result["dsinks"] = opts["sinks"].grad
    return result


def run_module(name: str, layout: str) -> dict:
    module, x, g, kwargs = ring_cases.build_module(name, dist.group.WORLD, layout)
    x, g = shard(x, 1, layout).requires_grad_(True), shard(g, 1, layout)
    y = ring_cases.module_output(module, x, kwargs)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    for t in grads.values():
        dist.all_reduce(t)  # every rank holds the gradient of its tokens' loss: the sum is the full gradient
    return {"out": y.detach(), "dx": x.grad, "params": grads}


def main() -> None:
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict = {}
    try:
        for name, case in ring_cases.CASES.items():
            if world > 2 and name not in ring_cases.CASES_P4:
                continue
            for layout in ("contiguous", "zigzag"):
                results[(name, layout)] = run(case, layout, torch.float32)
        for layout in ("contiguous", "zigzag"):
            results[("bf16", layout)] = run(ring_cases.BF16_CASE, layout, torch.bfloat16)
        for name in ring_cases.NN_CASES if world == 2 else ():
            for layout in ("contiguous", "zigzag"):
                results[(name, layout)] = run_module(name, layout)
        # every rank must refuse a call whose options differ across ranks (one cheap all-reduce)
        q = torch.randn(1, 2, 8, 16)
        try:
            ring_attention(q, q, q, is_causal=rank == 0)
            results["mismatch"] = "no error"
        except ValueError as err:
            results["mismatch"] = str(err)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
