"""The backend registry and dispatch: every attention implementation registers here, and ``"auto"`` picks among them.

:func:`dispatch` is the one path from a validated call to a backend. What it does for every backend, once:
empty calls (a zero batch, zero heads, ``Lq = 0`` or ``Lk = 0``) never reach a kernel; attention sinks are
merged through the log-sum-exp (:func:`attnkit.functional.merge.add_sinks`), so every backend that returns an
lse supports them; and the one interception point, :func:`attnkit.functional.observe.interceptor`, may wrap the
run (what :func:`attnkit.explain.capture` uses for differentiable capture and head gates).

A backend is an object with a ``name``, the set of ``options`` it implements, a ``priority`` for
``backend="auto"`` (lower runs first), a ``check(spec)`` returning why it cannot serve a call (or ``None``),
and a ``forward(spec)`` returning ``(output, weights, lse)``. Registering a name twice raises. New backends
(tiled, block-sparse, FlexAttention, ...) plug in with :func:`register` and need no change in the callers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from attnkit.functional import observe
from attnkit.functional.merge import add_sinks
from attnkit.functional.spec import AttentionSpec, lse_dtype, make_spec

__all__ = ["Backend", "BackendInfo", "Selection", "available", "dispatch", "get", "register", "select_for_spec"]

#: Every option a call can use, as named in :meth:`AttentionSpec.options`.
ALL_OPTIONS = frozenset(
    {
        "attn_mask_bool",
        "attn_mask_float",
        "is_causal",
        "window_size",
        "attn_bias",
        "alibi_slopes",
        "softcap",
        "dropout_p",
        "return_weights",
        "return_lse",
        "gqa",
        "mask_mod",
        "score_mod",
        "block_mask",
    }
)

ForwardResult = tuple[Tensor, Tensor | None, Tensor | None]


@dataclass(frozen=True)
class Backend:
    """One attention implementation.

    Attributes:
        name: registry key, e.g. ``"math"``.
        forward: ``spec -> (output, weights_or_None, lse_or_None)``.
        options: the :meth:`AttentionSpec.options` names it implements.
        priority: order for ``backend="auto"``; lower is tried first.
        description: one line for :func:`available`.
        check: ``spec -> reason or None``, for limits beyond the option set (device, dtype, sizes).
        fit: ``spec -> reason or None``, consulted by ``backend="auto"`` only: why this backend, although able
            to serve the call, is not the best fit for it (e.g. too small to pay off). A backend named
            explicitly ignores it.
    """

    name: str
    forward: Callable[[AttentionSpec], ForwardResult]
    options: frozenset[str]
    priority: int
    description: str
    check: Callable[[AttentionSpec], str | None] = field(default=lambda spec: None)
    fit: Callable[[AttentionSpec], str | None] = field(default=lambda spec: None)

    def why_not(self, spec: AttentionSpec, options: frozenset[str] | None = None) -> str | None:
        """Why this backend cannot serve ``spec``, or ``None`` if it can (``options``: ``spec.options()``)."""
        missing = (spec.options() if options is None else options) - self.options
        if missing:
            return f"backend {self.name!r} does not support {', '.join(sorted(missing))}"
        return self.check(spec)


@dataclass(frozen=True)
class BackendInfo:
    """Public description of a registered backend (see :func:`available`)."""

    name: str
    options: frozenset[str]
    priority: int
    description: str


@dataclass(frozen=True)
class Selection:
    """Which backend runs a call and why.

    Attributes:
        backend: name of the chosen backend.
        reasons: for every registered backend, why it was not chosen (``None`` for the chosen one and for
            those that could serve but rank lower, which are listed as ``"lower priority than ..."``).
    """

    backend: str
    reasons: dict[str, str | None]

    def __str__(self) -> str:
        lines = [f"selected backend: {self.backend}"]
        lines += [f"  {name}: {why}" for name, why in self.reasons.items() if name != self.backend]
        return "\n".join(lines)


_REGISTRY: dict[str, Backend] = {}
_ORDER: list[Backend] = []


def register(backend: Backend) -> Backend:
    """Add ``backend`` to the registry.

    Raises:
        ValueError: the name is taken, or ``options`` names an unknown option.
    """
    if backend.name in _REGISTRY or backend.name == "auto":
        raise ValueError(f"register: a backend named {backend.name!r} is already registered")
    unknown = backend.options - ALL_OPTIONS
    if unknown:
        raise ValueError(f"register: unknown options {sorted(unknown)}; valid: {sorted(ALL_OPTIONS)}")
    _REGISTRY[backend.name] = backend
    _ORDER.append(backend)
    _ORDER.sort(key=lambda b: b.priority)
    _PLAIN_CHOICE.clear()
    return backend


#: ``auto``'s choice for a plain call (no option but ``is_causal``), per (dtype, device type, is_causal, backends).
_PLAIN_CHOICE: dict[tuple, str] = {}


def plain_choice(dtype: torch.dtype, device: torch.device, is_causal: bool) -> str:
    """The backend ``auto`` selects for a plain ``(B, H, L, D)`` call of ``dtype`` on ``device`` (no mask, bias,
    mod, window, sinks, dropout or extra outputs; ``Lq == Lk``), cached until the next :func:`register`."""
    key = (dtype, device.type, is_causal, len(_ORDER))
    found = _PLAIN_CHOICE.get(key)
    if found is None:
        probe = torch.zeros(1, 1, 2, 8, dtype=dtype, device=device)
        found = _PLAIN_CHOICE[key] = select_for_spec(make_spec(probe, probe, probe, is_causal=is_causal)).backend
    return found


def get(name: str) -> Backend:
    """The backend registered as ``name``.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(repr(n) for n in ["auto", *_REGISTRY])
        raise ValueError(f"attention: unknown backend {name!r}; valid: {valid}") from None


def available() -> dict[str, BackendInfo]:
    """Registered backends in ``auto`` order, with the options each supports."""
    return {b.name: BackendInfo(b.name, b.options, b.priority, b.description) for b in _ORDER}


def select_for_spec(spec: AttentionSpec, backend: str = "auto") -> Selection:
    """Choose the backend for ``spec``.

    With ``backend="auto"``: the first backend in priority order whose :meth:`Backend.why_not` is ``None``.
    With a name: that backend, or ``ValueError`` naming what it cannot do.

    Raises:
        ValueError: a named backend cannot serve the call, or the name is unknown.
    """
    if spec.sinks is not None:  # sinks are merged through the lse: select for the call without them
        spec = _without_sinks(spec)
    if backend != "auto":
        chosen = get(backend)
        why = chosen.why_not(spec)
        if why is not None:
            raise ValueError(f"attention: {why}; use backend='auto' or one of: {_serving(spec)}")
        return Selection(backend, {backend: None})
    reasons: dict[str, str | None] = {}
    chosen_name = None
    options = spec.options()
    for b in _ORDER:
        if chosen_name is not None:
            reasons[b.name] = f"lower priority than {chosen_name!r}"
            continue
        why = b.why_not(spec, options)
        if why is None:
            why = b.fit(spec)
        reasons[b.name] = why
        if why is None:
            chosen_name = b.name
    if chosen_name is None:
        raise ValueError(f"attention: no backend can serve this call: {reasons}")
    return Selection(chosen_name, reasons)


def _serving(spec: AttentionSpec) -> str:
    names = [b.name for b in _ORDER if b.why_not(spec) is None]
    return ", ".join(repr(n) for n in names) or "none"


def _without_sinks(spec: AttentionSpec) -> AttentionSpec:
    return replace(spec, sinks=None, return_lse=True)


def _empty(spec: AttentionSpec) -> ForwardResult:
    """The result of a call with no work: zeros, lse ``-inf`` (the sink where there is one), zero gradients."""
    q, k, v = spec.query, spec.key, spec.value
    out = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=v.dtype, device=q.device)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out = out + 0.0 * (q.sum() + k.sum() + v.sum()).to(v.dtype)  # connected: zero gradients, not an error
    weights = torch.zeros(spec.scores_shape, dtype=q.dtype, device=q.device) if spec.return_weights else None
    lse = None
    if spec.return_lse:
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=lse_dtype(q.dtype), device=q.device)
        if spec.sinks is not None:
            lse = lse.clone() if spec.sinks.numel() == 0 else spec.sinks.to(lse.dtype).unsqueeze(-1).expand_as(lse)
    return out, weights, lse


def _run(spec: AttentionSpec, backend: str) -> ForwardResult:
    chosen = get(select_for_spec(spec, backend).backend)
    inner = spec if spec.sinks is None else _without_sinks(spec)
    with observe.inside_backend():
        out, weights, lse = chosen.forward(inner)
    if spec.sinks is not None:
        out, lse, weights = add_sinks(out, lse, spec.sinks, weights=weights)
        lse = lse if spec.return_lse else None
    return out, weights, lse


def dispatch(spec: AttentionSpec, backend: str = "auto") -> ForwardResult:
    """Run ``spec`` on ``backend`` (``"auto"``: the first capable backend in priority order).

    Returns:
        ``(output, weights or None, lse or None)`` as described in :class:`attnkit.AttentionOutput`.

    Raises:
        ValueError: unknown backend, or a named backend that cannot serve the call.
    """
    if spec.is_empty():
        select_for_spec(spec, backend)  # a named backend that cannot serve the call still raises
        return _empty(spec)
    wrap = observe.current_interceptor()
    if wrap is not None:
        return wrap(spec, lambda s: _run(s, backend))
    return _run(spec, backend)
