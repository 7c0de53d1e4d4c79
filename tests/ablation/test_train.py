"""The shared training loop: reproducible for a seed, identical batches for every variant, and DDP with 2
processes (gloo, loopback) equal to one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from attnkit.ablation.seq2seq import build_seq2seq
from attnkit.ablation.train import TrainConfig, fit, init_distributed, predict, seeded

CONFIG = TrainConfig(epochs=2, batch_size=8, lr=1e-2, seed=5)
PLATEAU = TrainConfig(
    epochs=8, batch_size=8, lr=1e-2, seed=5, budget="plateau", patience=1, min_delta=0.065, min_epochs=1
)


def _problem():
    """A tiny seq2seq problem (no BatchNorm, so DDP equals one process exactly up to rounding)."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 9, (40,), generator=g)
    src = torch.randint(4, 20, (40, 8), generator=g)
    src[torch.arange(8)[None, :] >= lengths[:, None]] = 0
    tgt = torch.cat([torch.ones(40, 1, dtype=torch.int64), torch.randint(3, 12, (40, 4), generator=g)], 1)

    def loss_fn(model, batch):
        s, n, t = batch
        return F.cross_entropy(model(s, n, t[:, :-1]).flatten(0, 1), t[:, 1:].flatten())

    return [src, lengths, tgt], loss_fn


def _train(name="additive", config=CONFIG, augment=None):
    data, loss_fn = _problem()
    sizes = {"embed_dim": 8, "num_heads": 2} if name == "transformer" else {"embed_dim": 8, "hidden_dim": 8}
    model = seeded(lambda: build_seq2seq(name, 20, 12, **sizes), config.seed)

    def validate(m):  # minus the loss on the first 16 rows (a stand-in for a validation split)
        with torch.no_grad():
            return -float(loss_fn(m, [t[:16] for t in data]))

    history = fit(model, data, loss_fn, config, augment=augment, validate=validate)
    return model, history


def test_reproducible_for_a_seed():
    a, losses_a = _train()
    b, losses_b = _train()
    assert losses_a == losses_b
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(v, w), k
    _, losses_c = _train(config=TrainConfig(**{**CONFIG.__dict__, "seed": 6}))
    assert losses_c != losses_a
    assert not a.training  # left in eval mode


def test_same_batches_and_augmentation_draws_for_every_variant():
    seen = {}

    def recorder(name):
        def augment(batch, generator):
            seen.setdefault(name, []).append((batch[2].clone(), torch.rand(3, generator=generator)))
            return batch

        return augment

    _train("none", augment=recorder("none"))
    _train("transformer", augment=recorder("transformer"))
    assert len(seen["none"]) == 2 * (40 // 8)
    for (ta, ra), (tb, rb) in zip(seen["none"], seen["transformer"]):
        assert torch.equal(ta, tb) and torch.equal(ra, rb)


def test_fit_errors():
    data, loss_fn = _problem()
    model = build_seq2seq("none", 20, 12)
    with pytest.raises(ValueError, match="fewer than one batch"):
        fit(model, data, loss_fn, TrainConfig(batch_size=64))
    with pytest.raises(ValueError, match="same length"):
        fit(model, [data[0], data[1][:3], data[2]], loss_fn, CONFIG)
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(epochs=0)


def test_predict_batches():
    x = torch.arange(10.0)[:, None]
    assert torch.equal(predict(lambda t: 2 * t, [x], batch_size=3), 2 * x)


def test_not_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert init_distributed() == (0, 1)


_WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from attnkit.ablation.train import init_distributed
    import torch.distributed as dist
    rank, world = init_distributed()
    assert world == 2, world
    from test_train import _train
    model, _ = _train()
    torch.save(model.state_dict(), {out!r} + f"/rank{{rank}}.pt")
    from test_train import PLATEAU
    model, history = _train(config=PLATEAU)
    torch.save({{**model.state_dict(), "val_score": torch.tensor(history.val_score)}},
               {out!r} + f"/rank{{rank}}_plateau.pt")
    dist.barrier()
    dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_equal_one_process(tmp_path):
    """Two gloo processes launched with torchrun's environment variables take the same steps as one process."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER.format(tests=os.path.dirname(__file__), out=str(tmp_path)))
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    procs = [
        subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    for suffix, config in (("", CONFIG), ("_plateau", PLATEAU)):
        states = [torch.load(tmp_path / f"rank{r}{suffix}.pt", weights_only=True) for r in range(2)]
        single, history = _train(config=config)
        for key, value in single.state_dict().items():
            assert torch.equal(states[0][key], states[1][key]), key  # DDP keeps the ranks identical
            torch.testing.assert_close(states[0][key], value, atol=1e-5, rtol=1e-4)  # and equal to one process
        if suffix:  # early stopping took the same decisions on both ranks and in one process
            assert history.lr_drops == [3] and history.stopped_early and history.best_epoch == 4
            assert states[0]["val_score"].tolist() == states[1]["val_score"].tolist()
            torch.testing.assert_close(states[0]["val_score"], torch.tensor(history.val_score), rtol=1e-4, atol=1e-5)
