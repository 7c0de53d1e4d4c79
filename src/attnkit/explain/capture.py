"""``capture(model)``: record every attention computation inside a model, without changing its outputs.

Three producers are intercepted for the duration of the ``with`` block, and released on exit (also on
exceptions):

* :func:`attnkit.attention` (attnkit's modules and backends), through :func:`attnkit.functional.observe.observer`;
* ``torch.nn.functional.scaled_dot_product_attention``, by replacing the module attribute (Hugging Face
  transformers' ``attn_implementation="sdpa"``, ``nn.MultiheadAttention(need_weights=False)``, hand-written
  models); the original kernel still computes the output;
* ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``'s native fast path, by forward hooks that
  recompute per-head weights from the module's projections.

Probabilities are recomputed on the side in query-row tiles, only for the selected layers, heads and rows.
Module paths come from forward pre-hooks on every submodule.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from attnkit.explain._intercept import HookPlan, Interceptor
from attnkit.explain.records import AttentionRecord, TokenLayout
from attnkit.explain.reducers import Reducer

__all__ = ["Recording", "capture", "capture_plan"]

#: What computes the attention of a captured model (see :func:`capture`'s ``kernel``).
_KERNELS = ("model", "math")


class Recording:
    """What a :func:`capture` block recorded.

    Attributes:
        maps: the :class:`AttentionRecord` list in call order.
        num_calls: attention computations intercepted, including those the filters left out.
        tokens: token strings of the inputs, set by the caller (one list, or one list per batch item); saved
            with the maps by :meth:`save`.
        model: the model's name or path, set by the caller; saved by :meth:`save`.
    """

    def __init__(self) -> None:
        self.maps: list[AttentionRecord] = []
        self.num_calls = 0
        self.tokens: list | None = None
        self.model: str | None = None

    def __len__(self) -> int:
        return len(self.maps)

    def __iter__(self) -> Iterator[AttentionRecord]:
        return iter(self.maps)

    def __getitem__(self, i: int) -> AttentionRecord:
        return self.maps[i]

    @property
    def layout(self) -> TokenLayout | None:
        """The first known token layout among the records, or ``None``."""
        return next((m.layout for m in self.maps if m.layout is not None), None)

    def weights(self, kind: str | None = None) -> list[Tensor]:
        """Stored weights in call order, optionally only records of ``kind`` (``"self"``, ``"cross"``, ...)."""
        return [m.weights for m in self.maps if m.weights is not None and (kind is None or m.kind == kind)]

    def stack(self, kind: str = "self") -> Tensor:
        """``(layers, B, H', Lq', Lk)``: the stored maps of ``kind`` stacked.

        Raises:
            ValueError: nothing stored, or maps of different shapes.
        """
        ws = self.weights(kind)
        if not ws:
            raise ValueError(f"Recording.stack: no stored {kind!r} maps (was store=False, or the kind absent?)")
        shapes = {tuple(w.shape) for w in ws}
        if len(shapes) > 1:
            raise ValueError(f"Recording.stack: {kind!r} maps have different shapes {sorted(shapes)}")
        return torch.stack(ws, 0)

    def save(
        self,
        path: str | os.PathLike,
        *,
        overwrite: bool = False,
        tokens: list | None = None,
        model: str | None = None,
    ) -> Path:
        """Write the recording to one safetensors file: the stored maps as tensors, and as JSON metadata in its
        header the records (layer names, kinds, shapes, selected heads/rows, layouts), ``tokens`` and ``model``
        (format: :mod:`attnkit.explain.recording_io`). Atomic; an existing file is kept unless ``overwrite``.

        Args:
            path: the file to write (``.safetensors`` by convention).
            overwrite: replace an existing file.
            tokens: token strings (default :attr:`tokens`): a list, or one list per batch item.
            model: the model's name or path (default :attr:`model`).

        Returns:
            the path written.

        Raises:
            FileExistsError: ``path`` exists and ``overwrite`` is False.
            FileNotFoundError: the directory does not exist.
            TypeError: ``tokens`` that are not strings, a ``model`` that is not a string.
            ValueError: a layout whose ``extra`` holds values JSON cannot store.
        """
        from attnkit.explain.recording_io import save_recording

        return save_recording(self, path, overwrite=overwrite, tokens=tokens, model=model)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recording:
        """Read a recording written by :meth:`save` (tensors on the CPU, read with safetensors: no pickle).

        Raises:
            FileNotFoundError: ``path`` does not exist.
            ValueError: not a safetensors file or not an attnkit recording.
        """
        from attnkit.explain.recording_io import load_recording

        return load_recording(path, cls)


def _int_tuple(value, name: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    try:
        out = tuple(value)
    except TypeError:
        raise TypeError(f"capture: expected {name} to be an int or a sequence of ints, got {value!r}") from None
    if not out or not all(isinstance(v, int) and not isinstance(v, bool) for v in out):
        raise TypeError(f"capture: expected {name} to be a non-empty sequence of ints, got {value!r}")
    return out


def capture_plan(model: nn.Module, *, example: Callable[[], object] | None = None) -> HookPlan:
    """Where :func:`capture` hooks ``model``, worked out once, for a model captured many times (a served model).

    ``capture(model, plan=plan)`` then skips walking the model's modules on entry (about a tenth of a millisecond
    per hundred modules). The plan is valid while the model's submodules stay the same.

    Args:
        model: the module to be captured.
        example: a function that runs ``model`` once (``lambda: model(x)``). When given, it runs inside a capture
            (recording no probabilities) and the plan hooks only the modules that computed attention in it, plus
            ``model`` itself and the modules whose published token layout was used: fewer hooks on every later
            capture (the shipped digit ViT: 6 of 10 modules; hooks cost a few microseconds per module call). For
            models whose attention is computed by the same modules for every input (a served classifier or
            encoder): attention computed inside any other module during a later capture raises RuntimeError.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; ``example`` is not callable.
        RuntimeError: ``example`` computed no attention inside ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture_plan: expected model to be a torch.nn.Module, got {type(model).__name__}")
    plan = HookPlan(model)
    if example is None:
        return plan
    if not callable(example):
        raise TypeError(f"capture_plan: expected example to be a callable running the model, got {example!r}")
    icpt = Interceptor(model, Recording(), plan=plan)  # counts where attention happens, records nothing
    with icpt:
        example()
    if not icpt.attending:
        raise RuntimeError(
            f"capture_plan: example computed no attention inside {type(model).__name__} (see capture for what "
            "is intercepted)"
        )
    return HookPlan(model, attending=icpt.attending, publishers=icpt.publishers)


@contextmanager
def capture(
    model: nn.Module,
    *,
    layers: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    query_rows: int | Sequence[int] | slice | None = None,
    head_mean: bool = False,
    reducers: Sequence[Reducer] = (),
    store: bool = True,
    layout: TokenLayout | None = None,
    differentiable: bool = False,
    plan: HookPlan | None = None,
    kernel: str = "model",
) -> Iterator[Recording]:
    """Record the attention probabilities of every attention computation inside ``model``.

    Example::

        with attnkit.explain.capture(model) as rec:
            out = model(**inputs)
        rec.maps[0].weights  # (B, H, L, L)

    With ``kernel="model"`` (the default) the model runs unchanged (its outputs are bit-identical with and
    without capture; its fused kernels still run); probabilities are recomputed on the side as
    ``softmax(scale · q kᵀ + mask)`` from each call's own query, key and mask (or from the log-sum-exp when the
    kernel returned it), in float32 (float64 for float64 models), tile by tile over query rows, only for the
    selected layers, heads and rows. The weights are those before dropout. Only computations that run inside
    ``model``'s forward are recorded.

    Args:
        model: the module whose forward calls are observed.
        layers: attention-layer indices to keep (see :attr:`AttentionRecord.layer`: the order in which attention
            modules first run); default all. Must be ``>= 0``.
        heads: head indices to keep; default all. ``head_mean`` averages over these.
        query_rows: query positions to keep (ints, negative counting from the end, or a slice); default all.
        head_mean: store ``(B, 1, Lq', Lk)`` head means instead of per-head maps (``H`` times less memory).
        reducers: :class:`attnkit.explain.reducers.Reducer` objects fed each selected map tile by tile
            (per head, before ``head_mean``); read them with ``reducer.result()`` after the block.
        store: keep the weights in the records; ``False`` keeps only metadata (use with ``reducers``).
        layout: the token layout to attach to every token record (class/register tokens, patch grid); by
            default what the producer reports, or for Hugging Face vision models, the grid of the patch
            embedding's input.
        differentiable: compute the attention itself through explicit probabilities (the math path) so that
            the stored weights are on the autograd path of the outputs (what :func:`relevance` needs). Outputs
            then match the fused kernels only up to rounding; ``heads``, ``query_rows`` and ``head_mean`` are
            not allowed.
        plan: ``capture_plan(model)``, built once for a model captured many times; default: walk ``model`` now.
        kernel: ``"model"`` (default): the model's own kernels compute the attention and the probabilities are
            recomputed on the side. ``"math"``: the selected layers' :func:`attnkit.attention` and
            ``F.scaled_dot_product_attention`` calls run on attnkit's math path
            (:func:`attnkit.backends.math.math_forward`, the ``"math"`` backend), and the probabilities it
            computes for the output are the ones recorded: one computation instead of two, for short inputs
            (it materialises the ``(B, H, Lq, Lk)`` scores of a call at once) where the fixed cost per call
            dominates. Outputs then equal the ``"math"`` backend's, which match the fused kernels up to
            rounding (float32: about 1e-6). ``nn.MultiheadAttention``'s native path is recomputed either way.

    Yields:
        a :class:`Recording`; ``rec.maps`` is filled as the model runs.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; filters that are not ints; reducers of the wrong type; a
            ``plan`` that is not a :func:`capture_plan`.
        ValueError: a ``plan`` of another model; an unknown ``kernel``; a negative layer index;
            ``differentiable`` with filters; a head or row index out of range for a map (raised during the
            forward); filters that selected nothing (on exit).
        RuntimeError: on exit, when no attention computation ran inside ``model`` (the message says what is
            intercepted and what to change).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture: expected model to be a torch.nn.Module, got {type(model).__name__}")
    layers_t = _int_tuple(layers, "layers")
    if layers_t is not None and min(layers_t) < 0:
        raise ValueError(f"capture: layers must be >= 0 (the number of layers is unknown in advance), got {layers_t}")
    heads_t = _int_tuple(heads, "heads")
    if heads_t is not None and min(heads_t) < 0:
        raise ValueError(f"capture: heads must be >= 0, got {heads_t}")
    if not (query_rows is None or isinstance(query_rows, slice)):
        query_rows = _int_tuple(query_rows, "query_rows")
    reducers = tuple(reducers)
    for r in reducers:
        if not isinstance(r, Reducer):
            raise TypeError(
                f"capture: reducers must be attnkit.explain.reducers.Reducer objects, got {type(r).__name__}"
            )
    if layout is not None and not isinstance(layout, TokenLayout):
        raise TypeError(f"capture: expected layout to be a TokenLayout or None, got {type(layout).__name__}")
    if differentiable and (heads_t is not None or query_rows is not None or head_mean):
        raise ValueError("capture: differentiable=True keeps whole maps; do not pass heads, query_rows or head_mean")
    if plan is not None:
        if not isinstance(plan, HookPlan):
            raise TypeError(f"capture: expected plan to come from capture_plan(model), got {type(plan).__name__}")
        if plan.model is not model:
            raise ValueError("capture: plan was made by capture_plan() for another model")
    if kernel not in _KERNELS:
        raise ValueError(f"capture: kernel must be one of {', '.join(map(repr, _KERNELS))}, got {kernel!r}")
    rec = Recording()
    icpt = Interceptor(
        model,
        rec,
        layers=layers_t,
        heads=heads_t,
        query_rows=query_rows,
        head_mean=bool(head_mean),
        reducers=reducers,
        store=bool(store),
        layout=layout,
        differentiable=bool(differentiable),
        plan=plan,
        math_kernel=kernel == "math",
    )
    with icpt:
        yield rec
    if rec.num_calls == 0:
        raise RuntimeError(
            f"capture: no attention computation ran inside {type(model).__name__}. capture sees attnkit.attention, "
            "torch.nn.functional.scaled_dot_product_attention and nn.MultiheadAttention; call the model inside "
            "the `with` block, and load Hugging Face models with attn_implementation='sdpa' (the 'eager' "
            "implementation computes softmax(QK^T) by hand and cannot be intercepted)"
        )
    if not rec.maps:
        raise ValueError(
            f"capture: the filters selected none of the {rec.num_calls} attention computations "
            f"(layers={layers_t}; the model has attention layers 0..{icpt.num_layers - 1})"
        )
