"""Reading the files of a checkpoint directory without trusting them.

Every file is checked to be a regular file (a FIFO would block the reader forever, ``/dev/zero`` never ends)
and, for JSON, to be small and shallow before it is parsed. Weight files are safetensors only (never pickle);
their headers (names, shapes, dtypes) are read without reading the data, so a loader can compare a config with
the weights before it allocates anything. Shards named by ``model.safetensors.index.json`` must be plain
relative names of regular files inside the checkpoint directory.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

__all__ = [
    "INDEX_NAME",
    "MAX_JSON_BYTES",
    "WEIGHTS_NAME",
    "CheckpointError",
    "TensorInfo",
    "checkpoint_dir",
    "file_in",
    "read_config",
    "read_header",
    "read_json",
    "read_tensors",
    "regular_file",
    "weight_files",
]

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
#: JSON files of a checkpoint (config, index, preprocessor, metadata) larger than this are refused (16 MiB).
MAX_JSON_BYTES = 16 * 2**20

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the one-line message lists every problem."""


@dataclass(frozen=True)
class TensorInfo:
    """What a safetensors header says about one tensor (known without reading its data).

    Attributes:
        shape: the tensor's shape.
        dtype: the torch dtype.
        file: the weight file holding it.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


def checkpoint_dir(path: str | os.PathLike) -> Path:
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


def regular_file(path: Path, what: str = "checkpoint") -> os.stat_result:
    """``os.stat`` of ``path`` (symlinks followed), refusing anything but a regular file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: a FIFO, device, socket or directory, or a symlink loop.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what}: {str(path)!r} does not exist") from None
    except OSError as err:  # ELOOP (symlink loop), ENAMETOOLONG, EACCES
        raise CheckpointError(f"{what}: cannot open {str(path)!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{what}: {str(path)!r} is not a regular file (a FIFO, device or directory)")
    return info


def read_json(path: str | os.PathLike, *, what: str = "checkpoint", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """Parse a JSON object from a regular file of at most ``max_bytes`` bytes.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a regular file, too large, not UTF-8, not JSON, nested too deeply, or not an object.
    """
    path = Path(path)
    size = regular_file(path, what).st_size
    if size > max_bytes:
        raise CheckpointError(f"{what}: {str(path)!r} is {size} bytes; JSON files above {max_bytes} bytes are refused")
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read(max_bytes + 1).decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{what}: {str(path)!r} is nested too deeply to be a configuration file") from None
    except (ValueError, OSError) as err:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise CheckpointError(f"{what}: {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{what}: {str(path)!r} must hold a JSON object, got {type(value).__name__}")
    return value


def read_config(directory: str | os.PathLike) -> dict:
    """Parse ``directory/config.json`` (see :func:`read_json`).

    Raises:
        FileNotFoundError, NotADirectoryError: see :func:`checkpoint_dir`, or no ``config.json``.
        CheckpointError: the file is not a small JSON object.
    """
    path = checkpoint_dir(directory) / "config.json"
    if not os.path.lexists(path):
        raise FileNotFoundError(f"checkpoint: no config.json in {str(path.parent)!r}")
    return read_json(path)


def file_in(directory: Path, name: object, what: str) -> Path:
    """``directory / name`` for a relative file ``name`` that stays inside ``directory``, if a regular file.

    Raises:
        CheckpointError: ``name`` is not a string, is absolute, climbs out with ``..``, or is not a regular file.
        FileNotFoundError: no such file.
    """
    parts = PurePosixPath(name).parts if isinstance(name, str) else ()
    if not parts or parts[0] == "/" or ".." in parts or "\\" in name or "\x00" in name:
        raise CheckpointError(f"{what}: {name!r:.80} is not a file name inside {str(directory)!r}")
    path = directory.joinpath(*parts)
    regular_file(path, what)
    return path


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint: ``model.safetensors``, or the shards of its index.

    Shard names must be relative names of regular files inside ``directory`` (symlinks, as in the Hugging Face
    cache, are followed to their regular file).

    Raises:
        FileNotFoundError, NotADirectoryError: see :func:`checkpoint_dir`; no safetensors weights (a
            ``pytorch_model.bin`` is refused: pickle files are never read); a missing shard.
        CheckpointError: a bad index or a weight file that is not a regular file.
    """
    directory = checkpoint_dir(directory)
    single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
    if os.path.lexists(single):
        regular_file(single)
        return [single]
    if os.path.lexists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"checkpoint: bad index {str(index)!r}: expected a non-empty 'weight_map' object")
        names = list(dict.fromkeys(weight_map.values()))
        return [file_in(directory, name, f"checkpoint: bad index {str(index)!r}: shard") for name in names]
    pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt*"))
    hint = (
        f" (found {', '.join(pickles[:3])}: pickle checkpoints such as pytorch_model.bin are not read; only "
        "safetensors is)"
        if pickles
        else ""
    )
    raise FileNotFoundError(f"checkpoint: no {WEIGHTS_NAME} or {INDEX_NAME} in {str(directory)!r}{hint}")


def _safe_open(path: Path):
    try:
        from safetensors import safe_open
    except ImportError as err:
        raise ImportError("reading checkpoints needs safetensors: pip install 'attnkit[hf]'") from err
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:  # SafetensorError, OSError; safetensors raises several types
        detail = " ".join(str(err).split())[:200]
        raise CheckpointError(
            f"checkpoint: cannot read {str(path)!r} as safetensors (truncated or corrupt file?): {detail}"
        ) from None


def read_header(directory: str | os.PathLike, files: list[Path] | None = None) -> dict[str, TensorInfo]:
    """Name -> :class:`TensorInfo` of every tensor of a checkpoint, from the safetensors headers only.

    safetensors validates each header (offsets contiguous and within the file, sizes matching shape x dtype)
    without reading the data.

    Raises:
        FileNotFoundError, NotADirectoryError, CheckpointError: see :func:`weight_files`; a corrupt header, an
            unsupported dtype, or one tensor in two shards.
        ImportError: ``safetensors`` is not installed (``pip install 'attnkit[hf]'``).
    """
    header: dict[str, TensorInfo] = {}
    for path in weight_files(directory) if files is None else files:
        with _safe_open(path) as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                if name in header:
                    raise CheckpointError(f"checkpoint: tensor {name!r} is in two weight files of {str(directory)!r}")
                part = f.get_slice(name)
                dtype = _DTYPES.get(part.get_dtype())
                if dtype is None:
                    raise CheckpointError(
                        f"checkpoint: tensor {name!r} in {str(path)!r} has unsupported dtype {part.get_dtype()}"
                    )
                header[name] = TensorInfo(tuple(part.get_shape()), dtype, path)
    return header


def read_tensors(
    directory: str | os.PathLike, names: set[str] | None = None, files: list[Path] | None = None
) -> dict[str, Tensor]:
    """The tensors of a checkpoint (all, or those in ``names``), read with ``safetensors`` on the CPU.

    ``files`` (checked regular files) replaces the weight files :func:`weight_files` finds in ``directory``.

    Raises:
        FileNotFoundError, NotADirectoryError, CheckpointError, ImportError: see :func:`read_header`; a file
            whose data cannot be read.
    """
    tensors: dict[str, Tensor] = {}
    for path in weight_files(directory) if files is None else files:
        with _safe_open(path) as f:
            for name in f.keys():  # noqa: SIM118
                if names is None or name in names:
                    try:
                        tensors[name] = f.get_tensor(name)
                    except Exception as err:
                        raise CheckpointError(
                            f"checkpoint: cannot read tensor {name!r} of {str(path)!r}: {' '.join(str(err).split())}"
                        ) from None
    return tensors
