"""What each vision attention block adds to a ResNet-50 bottleneck block: parameters, MACs and CPU latency.

For every ResNet-50 stage size (56x56x256, 28x28x512, 14x14x1024, 7x7x2048) the reference is one bottleneck
block (1x1 C->C/4, 3x3 C/4->C/4, 1x1 C/4->C, BatchNorm, identity shortcut; He et al. 2016) in eval mode; each
attention block (paper defaults) is applied to the block's output, and the table reports what it adds:

- params: parameters of the attention block, and as a share of the bottleneck block's.
- MACs: multiply-accumulates of convolutions and linear layers (``torch.utils.flop_counter`` / 2) plus the
  attention products ``Lq·Lk·(D + Dv)`` per head (read from attnkit's observation channel). Pooling, sigmoid
  and gating multiplies (about 2·C·H·W) are not counted, as in the papers' FLOP counts.
- latency: median CPU wall time of block + attention minus block alone (interleaved rounds), batch 1 and 32.

A whole-network line gives the parameters each block type adds to ResNet-50 (3, 4, 6, 3 blocks per stage),
to compare with the papers: SE adds about 2.5M parameters (~10%) to ResNet-50's 25.6M (Hu et al. 2018,
Table 2), ECA adds only ``k`` per block (80 in total for ECA-Net50, Wang et al. 2020, Table 2).

    python benchmarks/vision.py            # full run (minutes on 2 cores; the lead records RESULTS.md)
    python benchmarks/vision.py --quick    # smoke run: two small stages, batch 1 and 2, few rounds
"""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnkit.benchmark import interleaved_medians
from attnkit.functional import observe
from attnkit.vision import create_attention

STAGES = [(56, 256, 3), (28, 512, 4), (14, 1024, 6), (7, 2048, 3)]  # (side, channels, blocks) of ResNet-50
BLOCKS: dict[str, Callable[[int], nn.Module]] = {
    "se": lambda c: create_attention("se", c),
    "eca": lambda c: create_attention("eca", c),
    "cbam": lambda c: create_attention("cbam", c),
    "nonlocal": lambda c: create_attention("nonlocal", c),
}


def bottleneck(channels: int, device=None) -> nn.Module:
    """ResNet-50 bottleneck residual branch (identity shortcut added in :class:`_Residual`)."""
    mid = channels // 4
    return _Residual(
        nn.Sequential(
            nn.Conv2d(channels, mid, 1, bias=False, device=device),
            nn.BatchNorm2d(mid, device=device),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False, device=device),
            nn.BatchNorm2d(mid, device=device),
            nn.ReLU(),
            nn.Conv2d(mid, channels, 1, bias=False, device=device),
            nn.BatchNorm2d(channels, device=device),
        )
    )


class _Residual(nn.Module):
    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return torch.relu(self.branch(x) + x)


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: nn.Module, x: torch.Tensor) -> int:
    """Conv/linear MACs from FlopCounterMode plus attention products seen through the observer."""
    attn_macs = []

    def on_event(event):
        if event.spec is not None:
            q, k, v = event.spec.query, event.spec.key, event.spec.value
            attn_macs.append(q.shape[:-1].numel() * k.shape[-2] * (q.shape[-1] + v.shape[-1]))

    with torch.no_grad(), FlopCounterMode(display=False) as counter, observe.observer(on_event):
        module(x)
    return counter.get_total_flops() // 2 + sum(attn_macs)


def resnet50_params() -> int:
    """Parameters of ResNet-50 (stem, four stages of bottlenecks with projection shortcuts, 1000-way fc)."""
    total = 7 * 7 * 3 * 64 + 2 * 64 + 2048 * 1000 + 1000
    cin = 64
    for _, c, n in STAGES:
        for i in range(n):
            mid = c // 4
            total += (cin if i == 0 else c) * mid + 9 * mid * mid + mid * c + 2 * (2 * mid + c)
            if i == 0:
                total += cin * c + 2 * c  # projection shortcut
        cin = c
    return total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small stages, batch 1 and 2, few rounds")
    parser.add_argument("--blocks", nargs="*", default=list(BLOCKS), choices=list(BLOCKS))
    args = parser.parse_args(argv)
    stages = STAGES[2:] if args.quick else STAGES
    batches = (1, 2) if args.quick else (1, 32)
    rounds = 3 if args.quick else 15
    torch.manual_seed(0)
    cpu = platform.processor() or platform.machine()
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    print(
        "| stage | block | params | params / bottleneck | MACs / image | MACs / bottleneck | "
        + " | ".join(f"+ms (B={b})" for b in batches)
        + " |"
    )
    print("|---|---|---|---|---|---|" + "---|" * len(batches))
    for side, channels, _ in stages:
        base = bottleneck(channels).eval()
        x1 = torch.randn(1, channels, side, side)
        base_params, base_macs = count_params(base), count_macs(base, x1)
        print(
            f"| {side}x{side}x{channels} | bottleneck | {base_params:,} | 1 | {base_macs / 1e6:.1f}M | 1 |"
            + " |" * len(batches)
        )
        for name in args.blocks:
            attn = BLOCKS[name](channels).eval()
            params, macs = count_params(attn), count_macs(attn, x1)
            deltas = []
            for b in batches:
                x = torch.randn(b, channels, side, side)
                with torch.inference_mode():
                    times = interleaved_medians(
                        {"base": lambda x=x, m=base: m(x), "with": lambda x=x, m=base, a=attn: a(m(x))}, rounds=rounds
                    )
                deltas.append(1e3 * (times["with"] - times["base"]))
            print(
                f"| {side}x{side}x{channels} | {name} | {params:,} | {params / base_params:.2%} | "
                f"{macs / 1e6:.2f}M | {macs / base_macs:.2%} | " + " | ".join(f"{d:+.2f}" for d in deltas) + " |"
            )
    total = resnet50_params()
    print(f"\nResNet-50 parameters: {total:,}. Added by one block after every bottleneck (3, 4, 6, 3 per stage):")
    for name in args.blocks:
        added = sum(n * count_params(BLOCKS[name](c)) for _, c, n in STAGES)
        print(f"- {name}: +{added:,} ({added / total:.2%})")


if __name__ == "__main__":
    main()
