"""Context-parallel attention on CPU: 2 and 4 processes vs 1, and PyTorch's own context parallelism.

Question: what do ``attnkit.distributed.ring_attention`` processes cost and save per rank at long sequence
lengths, compared with one process running :func:`attnkit.attention` on the whole sequence?

Cases (B = 1, H = 8, D = 64, float32; L = 32768 and 65536):
  * causal -- ``is_causal=True``, zigzag layout (balanced);
  * window -- causal sliding window of 4096 keys, ``window_size=(4096, 0)``, contiguous layout (each rank needs
    only its left neighbour's block: one exchange instead of P - 1).
Each configuration runs in fresh processes launched here (gloo on 127.0.0.1): P = 1 runs the local call with
``--threads`` threads (default 2, the whole machine); P = 2 and 4 run one thread per process (P = 4 therefore
shares 2 cores between 4 processes). Reported per configuration: median forward time and one forward+backward
time of the slowest rank, and the peak resident memory per rank above the process's footprint after imports
(``ru_maxrss`` minus the RSS before the inputs are created: inputs, outputs and everything the call allocates).
PyTorch's ``torch.distributed.tensor.experimental.context_parallel`` is tried in the same run on the causal
case with 2 processes; where it cannot run on CPU/gloo the exact error is reported.

Usage:
    python benchmarks/context_parallel.py --quick      # smoke run: L = 4096, P = 1, 2
    python benchmarks/context_parallel.py              # full run (minutes; run under the shared lock)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

H, D = 8, 64
CASES = {
    "causal": ({"is_causal": True}, "zigzag"),
    "window": ({"window_size": (4096, 0)}, "contiguous"),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(rank: int, world: int, port: str, case: str, length: int, threads: int, repeats: int, backward: bool):
    import torch
    import torch.distributed as dist

    from attnkit.distributed import ring_attention

    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(minutes=30),
        )  # fmt: skip
    base = _rss_mib()
    opts, layout = CASES[case]
    gen = torch.Generator().manual_seed(rank)
    # only this rank's slice is ever created (its values do not change the work): memory is the rank's own
    q, k, v, g = (torch.randn(1, H, length // world, D, generator=gen) for _ in range(4))

    def sync():
        if world > 1:
            dist.barrier()

    fwd = []
    with torch.no_grad():
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            ring_attention(q, k, v, layout=layout, **opts)
            fwd.append(time.perf_counter() - t0)
    peak_fwd = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    row = {"rank": rank, "fwd_s": statistics.median(fwd), "peak_fwd_mib": peak_fwd}
    if backward:
        for t in (q, k, v):
            t.requires_grad_(True)
        sync()
        t0 = time.perf_counter()
        (ring_attention(q, k, v, layout=layout, **opts) * g).sum().backward()
        row["fwdbwd_s"] = time.perf_counter() - t0
        row["peak_fwdbwd_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps(row), flush=True)
    if world > 1:
        dist.destroy_process_group()


def torch_cp_worker(rank: int, world: int, port: str, length: int):
    """PyTorch's context parallelism on the causal case (CPU, gloo): prints the time or the error."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, length, D, generator=gen) for _ in range(3))
    try:
        with context_parallel(mesh, buffers=[q, k, v], buffer_seq_dims=[2, 2, 2]):
            t0 = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
            row = {"rank": rank, "fwd_s": time.perf_counter() - t0}
    except Exception as err:  # report exactly why it cannot run here
        row = {"rank": rank, "error": f"{type(err).__name__}: {err}"}
    print(json.dumps(row), flush=True)
    dist.destroy_process_group()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(world: int, args: list[str], timeout: float) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), port, *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world)
    ]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if p.returncode != 0 or not lines:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
        rows.append(json.loads(lines[-1]))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536])
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--threads", type=int, default=2, help="threads of the P = 1 run (default 2)")
    ap.add_argument("--repeats", type=int, default=2, help="forward repeats per configuration (median)")
    ap.add_argument("--backward-max-len", type=int, default=32768, help="forward+backward up to this L")
    ap.add_argument("--quick", action="store_true", help="L = 4096, P = 1, 2")
    ap.add_argument("--timeout", type=float, default=3600.0)
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.procs = [4096], [1, 2]
    load = os.getloadavg()
    print(f"# load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (2 cores)")
    results = []
    for case in args.cases:
        for length in args.lengths:
            backward = length <= args.backward_max_len
            for world in args.procs:
                threads = args.threads if world == 1 else 1
                rows = launch(
                    world,
                    [case, str(length), str(threads), str(args.repeats), str(int(backward))],
                    args.timeout,
                )
                res = {
                    "case": case,
                    "L": length,
                    "P": world,
                    "layout": CASES[case][1],
                    "fwd_s": max(r["fwd_s"] for r in rows),
                    "fwd_s_ranks": [round(r["fwd_s"], 2) for r in rows],
                    "peak_fwd_mib": max(r["peak_fwd_mib"] for r in rows),
                }
                if backward:
                    res["fwdbwd_s"] = max(r["fwdbwd_s"] for r in rows)
                    res["peak_fwdbwd_mib"] = max(r["peak_fwdbwd_mib"] for r in rows)
                results.append(res)
                print(json.dumps(res), flush=True)
    torch_cp = launch(2, ["torch_cp", str(min(args.lengths))], args.timeout)
    print(json.dumps({"torch_context_parallel": torch_cp[0]}), flush=True)
    print()
    print("| case | L | P | forward s (slowest rank) | vs P=1 | fwd+bwd s | vs P=1 | peak MiB/rank fwd | fwd+bwd |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        one = next(x for x in results if x["case"] == r["case"] and x["L"] == r["L"] and x["P"] == 1)
        fb = f"{r['fwdbwd_s']:.1f} | {r['fwdbwd_s'] / one['fwdbwd_s']:.2f}x" if "fwdbwd_s" in r else "- | -"
        mem_fb = f"{r['peak_fwdbwd_mib']:.0f}" if "peak_fwdbwd_mib" in r else "-"
        print(
            f"| {r['case']} | {r['L']} | {r['P']} | {r['fwd_s']:.2f} | {r['fwd_s'] / one['fwd_s']:.2f}x | {fb} | "
            f"{r['peak_fwd_mib']:.0f} | {mem_fb} |"
        )
    load = os.getloadavg()
    print(f"# load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        rank, world, port, case = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        if case == "torch_cp":
            torch_cp_worker(rank, world, port, int(sys.argv[6]))
        else:
            length, threads, repeats, backward = (int(x) for x in sys.argv[6:10])
            worker(rank, world, port, case, length, threads, repeats, bool(backward))
        sys.exit(0)
    sys.exit(main())
