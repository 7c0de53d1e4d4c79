"""Capture of Hugging Face transformers' multi-scale deformable attention (Deformable DETR, RT-DETR, ...).

transformers computes deformable attention in a module named ``MultiScaleDeformableAttention`` whose forward gets
``(value, value_spatial_shapes, value_spatial_shapes_list, level_start_index, sampling_locations,
attention_weights, im2col_step)``; a forward pre-hook on it reads the sampling locations and weights and reports
them as a ``"deformable"`` event, the same record attnkit's own
:class:`attnkit.vision.MultiScaleDeformableAttention` produces.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from attnkit.functional import observe

__all__ = ["deformable_pre_hook", "is_hf_deformable"]

_ARGS = (
    "value",
    "value_spatial_shapes",
    "value_spatial_shapes_list",
    "level_start_index",
    "sampling_locations",
    "attention_weights",
)


def is_hf_deformable(module: nn.Module) -> bool:
    """True for transformers' ``MultiScaleDeformableAttention`` kernel modules."""
    cls = type(module)
    return cls.__name__ == "MultiScaleDeformableAttention" and cls.__module__.startswith("transformers.")


def deformable_pre_hook(report: Callable[[observe.AttentionEvent], None]):
    """A ``register_forward_pre_hook(..., with_kwargs=True)`` hook that hands ``report`` a ``"deformable"`` event:
    weights ``(B, H, Lq, NL, P)``, layout ``sampling_locations`` ``(B, H, Lq, NL, P, 2)`` and ``spatial_shapes``."""

    def hook(module, args, kwargs):
        got = dict(zip(_ARGS, args))
        got.update({k: v for k, v in kwargs.items() if k in _ARGS})
        loc, weights = got.get("sampling_locations"), got.get("attention_weights")
        if loc is None or weights is None:
            return
        shapes = got.get("value_spatial_shapes_list")
        if shapes is None and got.get("value_spatial_shapes") is not None:
            shapes = got["value_spatial_shapes"].tolist()
        b, lq, h, nl, p = loc.shape[:5]
        layout = {
            "module": type(module).__name__,
            "sampling_locations": loc.detach().transpose(1, 2),
            "spatial_shapes": [tuple(int(v) for v in s) for s in shapes] if shapes is not None else None,
        }
        w = weights.detach().reshape(b, lq, h, nl, p).transpose(1, 2)
        report(observe.AttentionEvent("deformable", weights=w, layout=layout, source="transformers"))

    return hook
