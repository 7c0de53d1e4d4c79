"""A zero-cost-when-idle channel through which attention computations announce themselves, and the one
interception point of :func:`attnkit.functional.registry.dispatch`.

:func:`attnkit.attention` and attention-producing modules (channel/spatial gates in :mod:`attnkit.vision`)
call :func:`emit` with an :class:`AttentionEvent`; nothing happens unless an observer is installed with
:func:`observer` (what :func:`attnkit.explain.capture` does). Observers must not modify the tensors they see,
so a model's outputs are identical with and without observation.

:func:`interceptor` installs a function that wraps every dispatched call: ``fn(spec, run) -> (output, weights,
lse)``, where ``run(spec)`` runs the call on its backend. :func:`inside_backend` marks the time a backend runs,
so that a replacement of ``torch.nn.functional.scaled_dot_product_attention`` (what capture installs to see
foreign calls) can tell attnkit's own kernel calls from a model's.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from attnkit.functional.spec import AttentionSpec

__all__ = [
    "AttentionEvent",
    "current_interceptor",
    "emit",
    "in_backend",
    "inside_backend",
    "interceptor",
    "is_observed",
    "observer",
]


@dataclass
class AttentionEvent:
    """One attention computation, as seen by an observer.

    Attributes:
        kind: ``"scaled_dot_product"`` for :func:`attnkit.attention`; ``"channel"`` (weights ``(B, C)``),
            ``"spatial"`` (weights ``(B, 1, Hi, Wi)``) or ``"token"`` (weights ``(B, H, Lq, Lk)``) for modules that
            report a map directly.
        spec: the validated call (``kind == "scaled_dot_product"`` only), from which probabilities can be
            recomputed.
        output: the attention output the caller received.
        weights: the probabilities when the computation produced them anyway, else ``None``.
        lse: the float32 log-sum-exp ``(B..., H, Lq)`` when the backend produced it, else ``None``.
        layout: token layout facts the producer knows (e.g. ``num_prefix_tokens``, ``grid``), free-form.
        source: who computed it: ``"attnkit"``, or the library whose module a hook reports (``"transformers"``).
    """

    kind: str
    spec: AttentionSpec | None = None
    output: Tensor | None = None
    weights: Tensor | None = None
    lse: Tensor | None = None
    layout: dict[str, Any] = field(default_factory=dict)
    source: str = "attnkit"


_OBSERVERS: list[Callable[[AttentionEvent], None]] = []


def is_observed() -> bool:
    """True while at least one observer is installed (producers may skip building events otherwise)."""
    return bool(_OBSERVERS)


def emit(event: AttentionEvent) -> None:
    """Hand ``event`` to every installed observer, innermost first."""
    for fn in reversed(_OBSERVERS):
        fn(event)


@contextmanager
def observer(fn: Callable[[AttentionEvent], None]) -> Iterator[None]:
    """Install ``fn`` for the duration of the ``with`` block (removed on exit, also on exceptions)."""
    _OBSERVERS.append(fn)
    try:
        yield
    finally:
        _OBSERVERS.remove(fn)


_INTERCEPTORS: list[Callable] = []
_IN_BACKEND: contextvars.ContextVar[bool] = contextvars.ContextVar("attnkit_in_backend", default=False)


def current_interceptor() -> Callable | None:
    """The innermost installed interceptor, or ``None``."""
    return _INTERCEPTORS[-1] if _INTERCEPTORS else None


@contextmanager
def interceptor(fn: Callable) -> Iterator[None]:
    """Install ``fn(spec, run) -> (output, weights, lse)`` around every dispatched attention call for the block.

    ``run(spec)`` is the normal dispatch; ``fn`` may call it (and post-process its result) or replace it (e.g. by
    a differentiable recomputation). Removed on exit, also on exceptions.
    """
    _INTERCEPTORS.append(fn)
    try:
        yield
    finally:
        _INTERCEPTORS.remove(fn)


@contextmanager
def inside_backend() -> Iterator[None]:
    """Mark the running of a backend's kernel (see :func:`in_backend`)."""
    token = _IN_BACKEND.set(True)
    try:
        yield
    finally:
        _IN_BACKEND.reset(token)


def in_backend() -> bool:
    """True while an attnkit backend runs: its calls to torch kernels are attnkit's, not a model's."""
    return _IN_BACKEND.get()
