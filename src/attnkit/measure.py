"""Size and work of a model: trainable parameters and multiply-accumulates of one inference.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which records the FLOPs of every matrix
product and convolution the forward pass dispatches (``mm``, ``addmm``, ``bmm``, ``convolution``, the SDPA kernels
...) as ``2 x`` multiply-accumulates; we report ``FLOPs / 2``. torch does not register the CPU flash-attention
kernel ``aten._scaled_dot_product_flash_attention_for_cpu`` that :func:`attnkit.attention` reaches on CPU, so it is
added here with the same formula as torch's SDPA entries (``B·H·L·S·(D + Dv)`` MACs: ``q kᵀ`` and
``weights @ v``). Element-wise work (activations, softmax, normalisation, pooling) is not counted: the usual
convention (fvcore and ptflops count only the products too).

Low in the package's layers (it imports only torch), so that modules which insert attention into a model
(:func:`attnkit.vision.insert_attention`) and the ablation reports share it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_macs", "count_parameters"]


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
