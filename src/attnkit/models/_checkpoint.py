"""Reading Hugging Face checkpoint directories (``config.json`` + safetensors) into attnkit modules.

Shared by the model loaders (:mod:`attnkit.models.bert`, the ViT loader): read the config, read the tensors
with ``safetensors`` (never pickle), rename the keys, and load them into a module, refusing missing,
unexpected, mis-shaped or wrongly typed tensors with one error that lists them all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "checkpoint_dir", "load_state", "read_config", "read_tensors"]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message lists every problem."""


def checkpoint_dir(path: str | Path) -> Path:
    """``path`` as a :class:`~pathlib.Path` to an existing directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        NotADirectoryError: ``path`` is a file (pass the directory holding ``config.json`` and the weights).
    """
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint: {str(directory)!r} does not exist; expected a checkpoint directory")
    if not directory.is_dir():
        raise NotADirectoryError(
            f"checkpoint: {str(directory)!r} is a file; expected the directory that holds config.json and "
            f"{WEIGHTS_NAME}"
        )
    return directory


def read_config(directory: str | Path) -> dict:
    """Parse ``directory/config.json``.

    Raises:
        FileNotFoundError, NotADirectoryError: see :func:`checkpoint_dir`, or no ``config.json``.
        CheckpointError: the file is not a JSON object.
    """
    path = checkpoint_dir(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no config.json in {str(path.parent)!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"checkpoint: {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint: {str(path)!r} must hold a JSON object, got {type(config).__name__}")
    return config


def _load_file(path: Path) -> dict[str, Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError as err:
        raise ImportError("reading checkpoints needs safetensors: pip install attnkit[hf]") from err
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint: cannot read {str(path)!r} as safetensors (truncated or corrupt file?): {err}"
        ) from None


def read_tensors(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of ``directory/model.safetensors`` (or of the shards listed in
    ``model.safetensors.index.json``), read with ``safetensors`` on the CPU.

    Raises:
        FileNotFoundError, NotADirectoryError: see :func:`checkpoint_dir`, or no safetensors weights (a
            ``pytorch_model.bin`` is refused: pickle files are never read).
        CheckpointError: a truncated or corrupt file, or a bad index.
        ImportError: ``safetensors`` is not installed (``pip install attnkit[hf]``).
    """
    directory = checkpoint_dir(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if single.is_file():
        return _load_file(single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint: bad index {str(index)!r}: {err!r}") from None
        tensors: dict[str, Tensor] = {}
        for shard in shards:
            tensors.update(_load_file(directory / shard))
        return tensors
    hint = " (pickle checkpoints such as pytorch_model.bin are not read)" if any(directory.glob("*.bin")) else ""
    raise FileNotFoundError(f"checkpoint: no {WEIGHTS_NAME} or {INDEX_NAME} in {str(directory)!r}{hint}")


def _listing(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LISTED]
    more = f" (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return f"\n  {title} ({len(items)}): " + ", ".join(shown) + more


def load_state(
    module: nn.Module,
    tensors: dict[str, Tensor],
    rename: Callable[[str], str | None],
    *,
    source: str = "checkpoint",
) -> None:
    """Copy checkpoint ``tensors`` into ``module`` after renaming their keys, or raise listing every problem.

    Floating-point tensors are cast to the dtype of the parameter they fill (as transformers does); a
    non-floating tensor for a floating parameter (or the reverse) is an error.

    Args:
        module: the model to fill; every entry of its ``state_dict()`` must be provided.
        tensors: checkpoint name -> tensor, e.g. from :func:`read_tensors`.
        rename: checkpoint name -> ``module`` state-dict name, or ``None`` to skip the tensor (buffers such as
            ``position_ids``, heads the module does not have).
        source: how to name the checkpoint in the error message (e.g. its path).

    Raises:
        CheckpointError: missing, unexpected, mis-shaped or wrongly typed tensors (all listed), or two
            checkpoint tensors renamed to the same entry.
    """
    expected = module.state_dict()
    mapped: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    unexpected, duplicated, shapes, dtypes = [], [], [], []
    for name, tensor in tensors.items():
        target = rename(name)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(name if target == name else f"{name} (as {target})")
            continue
        if target in mapped:
            duplicated.append(f"{origin[target]} and {name} -> {target}")
            continue
        ref = expected[target]
        if tuple(tensor.shape) != tuple(ref.shape):
            shapes.append(f"{name}: checkpoint {tuple(tensor.shape)}, model {tuple(ref.shape)}")
        elif tensor.dtype.is_floating_point != ref.dtype.is_floating_point:
            dtypes.append(f"{name}: checkpoint {tensor.dtype}, model {ref.dtype}")
        mapped[target], origin[target] = tensor, name
    missing = [name for name in expected if name not in mapped]
    if missing or unexpected or duplicated or shapes or dtypes:
        message = f"{source} does not fit {type(module).__name__}:"
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mapped twice", duplicated),
            ("mis-shaped", shapes),
            ("wrong dtype", dtypes),
        ):
            if items:
                message += _listing(title, items)
        raise CheckpointError(message)
    with torch.no_grad():
        for name, value in module.state_dict(keep_vars=True).items():
            value.copy_(mapped[name].to(value.dtype))
