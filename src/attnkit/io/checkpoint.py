"""Loading Hugging Face checkpoint directories (``config.json`` + safetensors) into attnkit modules.

Shared by the model loaders (:mod:`attnkit.models.bert`, the ViT, the digit models): the model is built on the
``meta`` device (no memory), its state dict is compared with the safetensors *headers* (names, shapes, dtypes)
— missing, unexpected, mis-shaped or wrongly typed tensors are refused together in one message — and only then
is memory allocated and the data read. Weights holding NaN or inf warn (:class:`NonFiniteWeightsWarning`), or
are refused with ``nonfinite="error"``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

from attnkit.io.checkpoint_files import (
    CheckpointError,
    TensorInfo,
    checkpoint_dir,
    file_in,
    read_config,
    read_header,
    read_json,
    read_tensors,
)

__all__ = [
    "NONFINITE",
    "CheckpointError",
    "NonFiniteWeightsWarning",
    "TensorInfo",
    "check_against_header",
    "check_finite",
    "checkpoint_dir",
    "config_int",
    "file_in",
    "layer_count",
    "load_checkpoint",
    "load_from_header",
    "load_state",
    "read_config",
    "read_header",
    "read_json",
    "read_tensors",
]

_MAX_LISTED = 20
#: What to do with NaN/inf weights: warn (default), refuse, or accept silently.
NONFINITE = ("warn", "error", "ignore")
Rename = Callable[[str], "str | None"]


class NonFiniteWeightsWarning(UserWarning):
    """A checkpoint's floating-point weights contain NaN or inf (the model will compute NaN)."""


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"; {title} ({len(items)}): " + ", ".join(shown) + more


def _plan(
    expected: Mapping[str, Tensor], found: Mapping[str, tuple[tuple[int, ...], torch.dtype]], rename: Rename, what: str
) -> dict[str, str]:
    """Target state-dict name -> checkpoint name, or raise one :class:`CheckpointError` listing every problem."""
    mapped: dict[str, str] = {}
    unexpected, duplicated, shapes, dtypes = [], [], [], []
    for name, (shape, dtype) in found.items():
        target = rename(name)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(name if target == name else f"{name} (as {target})")
            continue
        if target in mapped:
            duplicated.append(f"{mapped[target]} and {name} -> {target}")
            continue
        ref = expected[target]
        if tuple(shape) != tuple(ref.shape):
            shapes.append(f"{name}: checkpoint {tuple(shape)}, model {tuple(ref.shape)}")
        elif dtype.is_floating_point != ref.dtype.is_floating_point:
            dtypes.append(f"{name}: checkpoint {dtype}, model {ref.dtype}")
        mapped[target] = name
    missing = [name for name in expected if name not in mapped]
    if missing or unexpected or duplicated or shapes or dtypes:
        message = f"{what}:"
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mapped twice", duplicated),
            ("mis-shaped", shapes),
            ("wrong dtype", dtypes),
        ):
            if items:
                message += _listing(title, items)
        raise CheckpointError(message.replace(":;", ":", 1))
    return mapped


def check_finite(tensors: Mapping[str, Tensor], *, nonfinite: str = "warn", source: str = "checkpoint") -> list[str]:
    """Names of the floating-point ``tensors`` holding NaN or inf; warn or raise about them.

    Args:
        tensors: name -> tensor.
        nonfinite: ``"warn"`` (:class:`NonFiniteWeightsWarning`), ``"error"`` (raise) or ``"ignore"``.
        source: how to name the checkpoint in the message.

    Raises:
        CheckpointError: non-finite weights and ``nonfinite="error"``.
        ValueError: an unknown ``nonfinite``.
    """
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {', '.join(map(repr, NONFINITE))}, got {nonfinite!r}")
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad and nonfinite != "ignore":
        message = f"{source} has weights with NaN or inf" + _listing("tensors", bad)
        if nonfinite == "error":
            raise CheckpointError(message)
        warnings.warn(message + " (the model will compute NaN)", NonFiniteWeightsWarning, stacklevel=3)
    return bad


def load_state(
    module: nn.Module,
    tensors: dict[str, Tensor],
    rename: Rename,
    *,
    source: str = "checkpoint",
    nonfinite: str = "warn",
) -> None:
    """Copy checkpoint ``tensors`` into ``module`` after renaming their keys, or raise listing every problem.

    Floating-point tensors are cast to the dtype of the parameter they fill (as transformers does); a
    non-floating tensor for a floating parameter (or the reverse) is an error. On any error ``module`` is left
    unchanged. ``module`` may live on the ``meta`` device: it is then materialised (``to_empty``) on the CPU.

    Args:
        module: the model to fill; every entry of its ``state_dict()`` must be provided.
        tensors: checkpoint name -> tensor, e.g. from :func:`read_tensors`.
        rename: checkpoint name -> ``module`` state-dict name, or ``None`` to skip the tensor (buffers such as
            ``position_ids``, heads the module does not have).
        source: how to name the checkpoint in the error message (e.g. its path).
        nonfinite: NaN/inf weights: ``"warn"``, ``"error"`` or ``"ignore"`` (see :func:`check_finite`).

    Raises:
        CheckpointError: missing, unexpected, mis-shaped or wrongly typed tensors (all listed), two
            checkpoint tensors renamed to the same entry, or non-finite weights with ``nonfinite="error"``.
    """
    expected = module.state_dict()
    found = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    mapped = _plan(expected, found, rename, f"{source} does not fit {type(module).__name__}")
    check_finite({name: tensors[name] for name in mapped.values()}, nonfinite=nonfinite, source=source)
    _fill(module, {target: tensors[name] for target, name in mapped.items()})


def _fill(module: nn.Module, values: dict[str, Tensor], device: torch.device | str | None = None) -> None:
    state = module.state_dict(keep_vars=True)
    if any(t.is_meta for t in state.values()):
        persistent = {id(t) for t in state.values()}
        stray = [name for name, b in module.named_buffers() if id(b) not in persistent]
        if stray:  # to_empty would leave them uninitialised
            raise RuntimeError(f"cannot materialise {type(module).__name__}: non-persistent buffers {stray}")
        module.to_empty(device=device or "cpu")
        state = module.state_dict(keep_vars=True)
    with torch.no_grad():
        for name, value in state.items():
            value.copy_(values[name].to(value.dtype))


def load_checkpoint(
    module: nn.Module,
    directory: str | os.PathLike,
    rename: Rename = lambda name: name,
    *,
    device: torch.device | str | None = None,
    nonfinite: str = "warn",
) -> nn.Module:
    """Fill ``module`` with the tensors of a safetensors checkpoint directory, checking before reading.

    The names, shapes and dtypes in the safetensors headers are compared with ``module.state_dict()`` first;
    the data is read only when everything fits. Build ``module`` on the ``meta`` device to allocate nothing
    before that check; it is then materialised on ``device`` (default CPU). On any error ``module`` is left
    unchanged.

    Args:
        module: the model to fill (every state-dict entry must be provided).
        directory: the checkpoint directory (``model.safetensors`` or a sharded index).
        rename: checkpoint name -> state-dict name, ``None`` to skip; default the identity.
        device: where a ``meta`` module is materialised (default CPU); ignored otherwise.
        nonfinite: NaN/inf weights: ``"warn"``, ``"error"`` or ``"ignore"``.

    Returns:
        ``module``.

    Raises:
        FileNotFoundError, NotADirectoryError: no such directory or no safetensors weights.
        CheckpointError: unreadable files, a bad index, tensors that do not fit (all listed), or non-finite
            weights with ``nonfinite="error"``.
        ImportError: ``safetensors`` is missing (``pip install 'attnkit[hf]'``).
    """
    source = f"checkpoint {str(directory)!r}"
    header = read_header(directory)
    return load_from_header(module, directory, header, rename, device=device, nonfinite=nonfinite, source=source)


def load_from_header(
    module: nn.Module,
    directory: str | os.PathLike,
    header: Mapping[str, TensorInfo],
    rename: Rename,
    *,
    device: torch.device | str | None = None,
    nonfinite: str = "warn",
    source: str = "checkpoint",
    files: list | None = None,
) -> nn.Module:
    """:func:`load_checkpoint` with a header already read by :func:`read_header` (from ``files``, when given)."""
    found = {name: (info.shape, info.dtype) for name, info in header.items()}
    mapped = _plan(module.state_dict(), found, rename, f"{source} does not fit {type(module).__name__}")
    tensors = read_tensors(directory, set(mapped.values()), files)
    check_finite(tensors, nonfinite=nonfinite, source=source)
    _fill(module, {target: tensors[name] for target, name in mapped.items()}, device)
    return module


def layer_count(header: Mapping[str, object], prefix: str) -> int:
    """Number of layers ``prefix<i>.`` in ``header`` names (``max i + 1``; 0 when none)."""
    indices = set()
    for name in header:
        if name.startswith(prefix):
            head = name[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def config_int(config: Mapping, key: str, source: str, *, default: int | None = None, maximum: int = 2**31) -> int:
    """``config[key]`` as a positive int no larger than ``maximum`` (JSON floats such as ``12.0`` refused).

    Raises:
        CheckpointError: missing (without default), not an int, a bool, below 1 or above ``maximum``.
    """
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise CheckpointError(f"{source}: config.json needs {key!r} as an integer in [1, {maximum}], got {value!r:.60}")
    return value


def check_against_header(
    source: str, header: Mapping[str, TensorInfo], checks: list[tuple[str, int, str, int]]
) -> None:
    """Refuse a config whose sizes disagree with the tensors on disk, before anything is built.

    Args:
        source: how to name the checkpoint.
        header: from :func:`read_header` (names already as in the checkpoint).
        checks: ``(config key, config value, tensor name, dim)``: ``header[tensor].shape[dim]`` must equal the
            value; a tensor absent from the header is skipped (reported later as missing).

    Raises:
        CheckpointError: listing every disagreement.
    """
    bad = []
    for key, value, tensor, dim in checks:
        info = header.get(tensor)
        if info is not None and (len(info.shape) <= dim or info.shape[dim] != value):
            bad.append(f"{key}={value} but {tensor} has shape {info.shape}")
    if bad:
        raise CheckpointError(f"{source}: config.json does not match the weights" + _listing("conflicts", bad))
