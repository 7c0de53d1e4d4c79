"""``attnkit.distributed.ring_attention`` on 2 and 4 gloo processes against the float64 single-process reference.

The processes are spawned by the fixture (``ring_worker.py``), each with one thread, and killed if they do not
finish within ``TIMEOUT`` seconds. Tolerances: float32 ring vs float64 reference ``atol = rtol = 2e-5`` for
outputs and lse, ``1e-4`` for gradients; bfloat16 ring error at most 2x the error of the same bfloat16 call on
one process (FlashAttention's rule; the float32 merge keeps it from growing with the number of ranks: each block's
output is rounded to bfloat16 once, then merged and summed in float32).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.distributed import unshard
from distributed import ring_cases

TIMEOUT = 240
HERE = Path(__file__).resolve().parent
F32 = {"atol": 2e-5, "rtol": 2e-5}
F32_GRAD = {"atol": 1e-4, "rtol": 1e-4}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world: int, out_dir: Path) -> list[dict]:
    """Run ``ring_worker.py`` on ``world`` processes; return each rank's results."""
    env = dict(os.environ)
    src = str(Path(attnkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "ring_worker.py"), str(r), str(world), port, str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(world)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{world} ring workers did not finish within {TIMEOUT} s")
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r}:\n{res['error']}"
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["P2", "P4"])
def ranks(request, tmp_path_factory) -> list[dict]:
    return spawn(request.param, tmp_path_factory.mktemp(f"ring{request.param}"))


def _gather(ranks: list[dict], key, field: str, layout: str) -> torch.Tensor:
    dim = -1 if field == "lse" else -2
    return unshard([r[key][field] for r in ranks], dim, layout).double()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", list(ring_cases.CASES))
def test_matches_float64_reference(ranks, name, layout):
    if (name, layout) not in ranks[0]:
        pytest.skip(f"{name} runs on 2 processes only ({len(ranks)} here)")
    ref = ring_cases.reference(*ring_cases.build(ring_cases.CASES[name], torch.float64))
    for field, expected in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), ref):
        if field == "dsinks":
            if expected is not None:
                got = ranks[0][(name, layout)]["dsinks"].double()
                torch.testing.assert_close(got, expected, **F32_GRAD, msg=lambda m: f"{name}/{layout}/dsinks: {m}")
            continue
        got = _gather(ranks, (name, layout), field, layout)
        tol = F32 if field in ("out", "lse") else F32_GRAD
        torch.testing.assert_close(got, expected, **tol, msg=lambda m, f=field: f"{name}/{layout}/{f}: {m}")


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_bf16_error_does_not_grow_with_ranks(ranks, layout):
    q, k, v, g_out, g_lse, opts = ring_cases.build(ring_cases.BF16_CASE, torch.bfloat16)
    ref = ring_cases.reference(q, k, v, g_out, g_lse, opts)
    qs, ks, vs = (t.detach().requires_grad_(True) for t in (q, k, v))
    one = attnkit.attention(qs, ks, vs, return_lse=True, **opts)
    ((one.output.double() * g_out).sum() + (one.lse.double() * g_lse).sum()).backward()
    with torch.no_grad():  # the ring's forward runs without autograd too: the same kernel (tiled's fused step)
        fwd = attnkit.attention(q, k, v, return_lse=True, **opts)
    single = (fwd.output, fwd.lse, qs.grad, ks.grad, vs.grad)
    for field, expected, base in zip(("out", "lse", "dq", "dk", "dv"), ref[:5], single):
        got = _gather(ranks, ("bf16", layout), field, layout)
        err_ring = (got - expected).abs().max().item()
        err_one = (base.double() - expected).abs().max().item()
        assert err_ring <= 2 * err_one + 1e-6, f"{field}: ring {err_ring:.3g} vs one process {err_one:.3g}"


def test_options_checked_across_ranks(ranks):
    for r in ranks:
        assert "different options" in r["mismatch"]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("name", ring_cases.NN_CASES)
def test_modules_with_a_process_group_match_one_process(ranks, name, layout):
    if (name, layout) not in ranks[0]:
        pytest.skip(f"{name} runs on 2 processes only ({len(ranks)} here)")
    module, x, g, kwargs = ring_cases.build_module(name)
    module.double()
    x = x.double().requires_grad_(True)
    y = ring_cases.module_output(module, x, kwargs)
    (y * g.double()).sum().backward()
    got_out = unshard([r[(name, layout)]["out"] for r in ranks], 1, layout).double()
    got_dx = unshard([r[(name, layout)]["dx"] for r in ranks], 1, layout).double()
    torch.testing.assert_close(got_out, y.detach(), **F32)
    torch.testing.assert_close(got_dx, x.grad, **F32_GRAD)
    for n, p in module.named_parameters():
        torch.testing.assert_close(ranks[0][(name, layout)]["params"][n].double(), p.grad, **F32_GRAD, msg=n)
