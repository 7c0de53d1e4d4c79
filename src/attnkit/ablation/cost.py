"""What a variant costs at inference: parameters, multiply-accumulates and CPU latency.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which records the FLOPs of every matrix
product and convolution the forward pass dispatches (``mm``, ``addmm``, ``bmm``, ``convolution``, the SDPA kernels
...) as ``2 x`` multiply-accumulates; we report ``FLOPs / 2``. torch does not register the CPU flash-attention
kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` that :func:`attnkit.attention` reaches on CPU, so it is
added here with the same formula as torch's SDPA entries (``B·H·L·S·(D + Dv)`` MACs: ``q kᵀ`` and
``weights @ v``). Element-wise work (activations, softmax, normalisation, pooling, GRU gates' non-linearities) is
not counted — the usual convention (e.g. fvcore, ptflops count only the products too).

Latency is the median wall time of repeated runs, interleaved across variants in one process
(:func:`attnkit.benchmark.interleaved_medians`), so drift in the machine's speed affects every variant alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from attnkit.benchmark import interleaved_medians

__all__ = ["count_macs", "count_parameters", "interleaved_latency"]


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, lq, d = query_shape
    s, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * lq * s * (d + dv)


def _custom_mapping() -> dict:
    ops = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:  # FlopCounterMode applies its shape wrapper to custom entries itself
        ops[op] = _sdpa_cpu_flops
    return ops


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(fn: Callable[[], object]) -> int:
    """Multiply-accumulates of running ``fn()`` once (matrix products, convolutions and attention; see module).

    Args:
        fn: a closure running one inference (e.g. ``lambda: model(x)``), called once under inference mode.

    Returns:
        ``FLOPs // 2`` as counted by ``FlopCounterMode`` (with the CPU flash-attention kernel added).

    Example:
        >>> count_macs(lambda: torch.nn.Linear(8, 4)(torch.zeros(2, 8)))  # 2 rows x 8 x 4
        64
    """
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=_custom_mapping()) as counter:
        fn()
    return counter.get_total_flops() // 2


def interleaved_latency(
    contenders: dict[str, Callable[[], object]], *, rounds: int = 20, warmup: int = 2
) -> dict[str, float]:
    """Median seconds per call of each closure, run round-robin ``rounds`` times after ``warmup`` rounds.

    Runs under :func:`torch.inference_mode`; uses the current ``torch.get_num_threads()`` threads.
    """
    if rounds < 1:
        raise ValueError(f"interleaved_latency: expected rounds >= 1, got {rounds}")
    with torch.inference_mode():
        return interleaved_medians(contenders, rounds=rounds, warmup=warmup)
