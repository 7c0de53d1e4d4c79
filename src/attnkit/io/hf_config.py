"""Checks a Hugging Face ``config.json`` against the safetensors headers before ``transformers`` builds the model.

``transformers`` allocates the model the config describes before it reads the weights, so a config asking for
``hidden_size=10**9`` or ``num_hidden_layers=10**6`` costs memory and time before anything fails. These checks
compare the sizes that decide that cost (layer count, hidden size, vocabulary, positions) with the tensors on
disk first. Field names follow transformers (``num_hidden_layers`` / GPT-2's ``n_layer``, ...).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from attnkit.io.checkpoint_files import CheckpointError, TensorInfo

__all__ = ["check_directory_entries", "check_transformers_config"]

#: config keys (first present wins) for each size, as transformers names them across families.
_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_POSITIONS = ("n_positions", "max_position_embeddings")
_EMBEDDING = re.compile(r"(^|\.)(wte|embed_tokens|word_embeddings)\.weight$")
_POSITION_TABLE = re.compile(r"(^|\.)(wpe|position_embeddings)\.weight$")
_LAYER = re.compile(r"(?:^|\.)(?:h|layers?|blocks)\.(\d+)\.")
_MAX = 2**31


def _get(config: Mapping, keys: tuple[str, ...], source: str) -> tuple[str, int] | None:
    for key in keys:
        if key in config:
            value = config[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _MAX:
                raise CheckpointError(
                    f"{source}: config.json needs {key!r} as an integer in [1, {_MAX}], got {value!r:.60}"
                )
            return key, value
    return None


def check_transformers_config(config: Mapping, header: Mapping[str, TensorInfo], source: str) -> None:
    """Refuse a config whose sizes disagree with the weights (checked on names and shapes only).

    Weights and biases must be floating point. Checked when present: the layer count (``num_hidden_layers`` /
    ``n_layer``) against the distinct layer indices in the tensor names; ``vocab_size`` and the hidden size
    against the token embedding ``(vocab, hidden)``; the position count against a learned position table.
    Every such field must be an integer in ``[1, 2**31]``.

    Raises:
        CheckpointError: a field of the wrong type, or a size that disagrees with the weights.
    """
    ints = [
        f"{name} ({info.dtype})"
        for name, info in header.items()
        if name.endswith(("weight", "bias")) and not info.dtype.is_floating_point
    ]
    if ints:
        raise CheckpointError(f"{source}: weights must be floating point, got {', '.join(ints[:10])}")
    layers = _get(config, _LAYERS, source)
    hidden = _get(config, _HIDDEN, source)
    vocab = _get(config, ("vocab_size",), source)
    positions = _get(config, _POSITIONS, source)
    problems = []
    if layers is not None:
        found = {int(m.group(1)) for name in header if (m := _LAYER.search(name))}
        count = max(found) + 1 if found else 0
        if count != layers[1]:
            problems.append(f"{layers[0]}={layers[1]} but the weights hold {count} layers")
    embedding = next((info for name, info in header.items() if _EMBEDDING.search(name)), None)
    if embedding is not None and len(embedding.shape) == 2:
        for field, dim in ((vocab, 0), (hidden, 1)):
            if field is not None and embedding.shape[dim] != field[1]:
                problems.append(f"{field[0]}={field[1]} but the token embedding has shape {embedding.shape}")
    table = next((info for name, info in header.items() if _POSITION_TABLE.search(name)), None)
    if positions is not None and table is not None and table.shape[:1] != (positions[1],):
        problems.append(f"{positions[0]}={positions[1]} but the position table has shape {table.shape}")
    if problems:
        raise CheckpointError(f"{source}: config.json does not match the weights: " + "; ".join(problems))


def check_directory_entries(directory: str | os.PathLike, source: str) -> None:
    """Refuse a checkpoint directory holding FIFOs, devices, sockets or symlink loops (a reader would hang on
    them or read forever), before a third-party loader opens whatever files it looks for.

    Raises:
        CheckpointError: naming the first such entry.
    """
    for entry in sorted(Path(directory).iterdir()):
        try:
            mode = os.stat(entry).st_mode
        except FileNotFoundError:  # a dangling symlink: nobody can open it
            continue
        except OSError as err:
            raise CheckpointError(f"{source}: cannot open {entry.name!r}: {err.strerror or err}") from None
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise CheckpointError(f"{source}: {entry.name!r} is not a regular file (a FIFO, device or socket)")
