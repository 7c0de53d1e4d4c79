"""What a variant costs at inference: parameters, multiply-accumulates (:mod:`attnkit.measure`) and CPU latency.

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

from attnkit.benchmark import interleaved_medians
from attnkit.measure import count_macs, count_parameters

__all__ = ["count_macs", "count_parameters", "interleaved_latency"]


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
