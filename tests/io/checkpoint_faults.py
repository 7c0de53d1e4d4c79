"""Broken and hostile checkpoint directories for every loader, and a worker that tries them all.

Run as ``python checkpoint_faults.py WORKDIR``: builds a tiny valid checkpoint per loader (BERT, ViT, GPT-2 via
the text loader, the digit models), derives one directory per fault, runs the loader on each under a time limit,
and prints one JSON object: per case the exception type, message, seconds and how much the process's peak memory
grew. ``test_checkpoint_faults.py`` runs it in a fresh interpreter (so the memory peak means something) and
asserts on the result.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import shutil
import signal
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

FAMILIES = ("bert", "vit", "gpt2", "digits")
TIME_LIMIT_S = 20
MARKER = "pickle-ran"

# Config-level faults per family: (case name, key, value). Keys are each family's config.json field names.
CONFIG_FAULTS = {
    "bert": [
        ("hidden_size_1e9", "hidden_size", 10**9),
        ("vocab_1e12", "vocab_size", 10**12),
        ("layers_1e6", "num_hidden_layers", 10**6),
        ("hidden_size_str", "hidden_size", "16"),
        ("hidden_size_nan", "hidden_size", math.nan),
        ("hidden_size_negative", "hidden_size", -16),
        ("eps_inf", "layer_norm_eps", math.inf),
    ],
    "vit": [
        ("hidden_size_1e9", "hidden_size", 10**9),
        ("layers_1e6", "num_hidden_layers", 10**6),
        ("image_size_list", "image_size", [32, 32]),
        ("image_size_huge", "image_size", 10**9),
        ("heads_str", "num_attention_heads", "2"),
    ],
    "gpt2": [
        ("n_embd_1e9", "n_embd", 10**9),
        ("vocab_1e12", "vocab_size", 10**12),
        ("n_layer_1e6", "n_layer", 10**6),
        ("n_embd_negative", "n_embd", -8),
    ],
    "digits": [
        ("embed_dim_1e9", "embed_dim", 10**9),
        ("depth_1e6", "depth", 10**6),
        ("patch_size_str", "patch_size", "8"),
        ("unknown_argument", "rotary", True),
    ],
}


# ----------------------------------------------------------------------------------------------- valid checkpoints
def make_valid(family: str, path: Path) -> None:
    """A tiny valid checkpoint of ``family`` in ``path`` (created)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path.mkdir(parents=True)
    if family == "bert":
        import transformers

        config = transformers.BertConfig(
            vocab_size=30, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
        )
        transformers.BertModel(config).save_pretrained(path)
    elif family == "vit":
        import transformers

        config = transformers.ViTConfig(
            image_size=16, patch_size=8, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
        )
        transformers.ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    elif family == "gpt2":
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

        words = ["<|endoftext|>", "the", "cat", "sat"]
        tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
        GPT2Model(GPT2Config(vocab_size=4, n_positions=16, n_embd=8, n_layer=2, n_head=2)).save_pretrained(path)
        fast.save_pretrained(path)
    else:
        from attnkit.vision.digits import build_model

        config = {
            "image_size": 16,
            "patch_size": 8,
            "in_chans": 1,
            "num_classes": 3,
            "embed_dim": 8,
            "depth": 1,
            "num_heads": 2,
            "mlp_ratio": 2.0,
            "patch_embed": "conv",
        }
        model = build_model("vit", dict(config))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "digits_vit.safetensors"))
        meta = {"models": {"vit": {"config": config, "weights": "digits_vit.safetensors"}}}
        (path / "digits.json").write_text(json.dumps(meta))


def weights_path(family: str, path: Path) -> Path:
    return path / ("digits_vit.safetensors" if family == "digits" else "model.safetensors")


def config_path(family: str, path: Path) -> Path:
    return path / ("digits.json" if family == "digits" else "config.json")


def edit_config(family: str, path: Path, edit: Callable[[dict], None]) -> None:
    file = config_path(family, path)
    data = json.loads(file.read_text())
    edit(data["models"]["vit"]["config"] if family == "digits" else data)
    file.write_text(json.dumps(data))  # NaN/inf are written as the NaN/Infinity tokens Python's json reads


def load(family: str, path: Path, **kwargs):
    """Run ``family``'s loader on ``path``."""
    if family == "bert":
        from attnkit.models import BertModel

        return BertModel.from_pretrained(path, **kwargs)
    if family == "vit":
        from attnkit.vision import VisionTransformer

        return VisionTransformer.from_pretrained(path, **kwargs)
    if family == "gpt2":
        from attnkit.text import load_text_model

        return load_text_model(path, **kwargs)
    from attnkit.vision.digits import load_model

    return load_model("vit", directory=path, **kwargs)


# ------------------------------------------------------------------------------------------------ file-level faults
class Payload:
    """Unpickling this creates the marker file: the side effect that must never happen."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _header(file: Path) -> tuple[dict, bytes]:
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_header(file: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first_float(header: dict) -> str:
    return next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F32")


def _retype(file: Path) -> None:
    header, data = _header(file)
    name = _first_float(header)
    header[name]["dtype"] = "I32"  # same byte size, so the header stays consistent
    _write_header(file, header, data)


def _reshape(file: Path) -> None:
    header, data = _header(file)
    name = _first_float(header)
    shape = header[name]["shape"]
    n = math.prod(shape)
    header[name]["shape"] = [n] if len(shape) > 1 else [1, n]
    _write_header(file, header, data)


def _bad_offsets(file: Path) -> None:
    header, data = _header(file)
    name = _first_float(header)
    start, end = header[name]["data_offsets"]
    header[name]["data_offsets"] = [start, end + 4 * 10**6]  # beyond the end of the file
    _write_header(file, header, data)


def _drop_tensor(file: Path, extra: bool) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    if extra:
        import torch

        tensors["not.a.parameter"] = torch.zeros(3)
    else:
        del tensors[sorted(tensors)[-1]]
    save_file(tensors, str(file))


def _nan(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    name = next(k for k, v in sorted(tensors.items()) if v.is_floating_point())
    tensors[name][..., 0] = float("nan")
    save_file(tensors, str(file))


def _index(family: str, path: Path, shard: str) -> None:
    """Replace the weights by an index naming ``shard`` (the weights renamed to a legal shard too)."""
    weights = weights_path(family, path)
    os.replace(weights, path / "model-00001-of-00002.safetensors")
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors", "b": shard}})
    )


def file_faults(workdir: Path) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Fault name -> ``mutate(family, dir)``; applied to every family (the index faults not to the digits)."""
    marker = str(workdir / MARKER)
    outside = workdir / "outside.safetensors"

    def replace_weights(data: bytes):
        return lambda f, p: weights_path(f, p).write_bytes(data)

    def fifo(f, p):
        weights_path(f, p).unlink()
        os.mkfifo(weights_path(f, p))

    def loop(f, p):
        weights_path(f, p).unlink()
        os.symlink(weights_path(f, p).name, weights_path(f, p))

    def to_dev_zero(f, p):
        weights_path(f, p).unlink()
        os.symlink("/dev/zero", weights_path(f, p))

    def only_pickle(f, p):
        weights_path(f, p).unlink()
        (p / "pytorch_model.bin").write_bytes(pickle.dumps(Payload(marker)))

    def config_fifo(f, p):
        config_path(f, p).unlink()
        os.mkfifo(config_path(f, p))

    def config_deep(f, p):
        config_path(f, p).write_text("[" * 200_000 + "]" * 200_000)

    def config_huge(f, p):
        with open(config_path(f, p), "r+b") as file:
            file.truncate(64 * 2**20)  # sparse: no disk used, but a reader would parse 64 MB

    def config_not_object(f, p):
        config_path(f, p).write_text("[1, 2]")

    def config_garbage(f, p):
        config_path(f, p).write_bytes(b"{\xff\xfe not json")

    def truncate(f, p):
        w = weights_path(f, p)
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])

    faults = {
        "truncated": truncate,
        "seven_bytes": replace_weights(b"\x00" * 7),
        "huge_header_length": lambda f, p: weights_path(f, p).write_bytes(struct.pack("<Q", 2**62) + b"{}"),
        "header_longer_than_file": lambda f, p: weights_path(f, p).write_bytes(struct.pack("<Q", 10**6) + b"{}"),
        "header_garbage": lambda f, p: weights_path(f, p).write_bytes(struct.pack("<Q", 8) + b"\xff" * 8),
        "wrong_dtype": lambda f, p: _retype(weights_path(f, p)),
        "wrong_shape": lambda f, p: _reshape(weights_path(f, p)),
        "offsets_past_end": lambda f, p: _bad_offsets(weights_path(f, p)),
        "missing_tensor": lambda f, p: _drop_tensor(weights_path(f, p), extra=False),
        "extra_tensor": lambda f, p: _drop_tensor(weights_path(f, p), extra=True),
        "pickle_as_safetensors": replace_weights(pickle.dumps(Payload(marker))),
        "only_pickle_bin": only_pickle,
        "weights_fifo": fifo,
        "weights_symlink_loop": loop,
        "weights_dev_zero": to_dev_zero,
        "config_fifo": config_fifo,
        "config_nested_200000": config_deep,
        "config_64mb": config_huge,
        "config_not_object": config_not_object,
        "config_not_utf8": config_garbage,
        "nan_weights_strict": lambda f, p: _nan(weights_path(f, p)),
    }
    index_faults = {
        "shard_parent_dir": lambda f, p: _index(f, p, "../" + outside.name),
        "shard_absolute": lambda f, p: _index(f, p, "/etc/passwd"),
        "shard_fifo": lambda f, p: (os.mkfifo(p / "fifo.safetensors"), _index(f, p, "fifo.safetensors")),
        "shard_not_string": lambda f, p: _index(f, p, 7),
    }
    return faults, index_faults


def cases(workdir: Path) -> dict[str, tuple[str, Path, dict]]:
    """Case id -> (family, directory, loader kwargs), every directory built under ``workdir``."""
    import torch
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(workdir / "outside.safetensors"))
    valid = {f: workdir / f"valid_{f}" for f in FAMILIES}
    for family, path in valid.items():
        make_valid(family, path)
    out: dict[str, tuple[str, Path, dict]] = {}
    faults, index_faults = file_faults(workdir)
    for family in FAMILIES:
        todo = dict(faults) if family == "digits" else {**faults, **index_faults}
        if family == "digits":  # its weights file is named by digits.json, not by an index
            todo["weights_outside"] = lambda f, p: edit_config_entry(p, "weights", "../outside.safetensors")
            todo["weights_missing_entry"] = lambda f, p: edit_config_entry(p, "config", None)
        for name, mutate in todo.items():
            target = workdir / f"{family}__{name}"
            shutil.copytree(valid[family], target, symlinks=True)
            mutate(family, target)
            out[f"{family}:{name}"] = (family, target, {"nonfinite": "error"} if name.startswith("nan") else {})
        for name, key, value in CONFIG_FAULTS[family]:
            target = workdir / f"{family}__config_{name}"
            shutil.copytree(valid[family], target, symlinks=True)
            edit_config(family, target, lambda c, key=key, value=value: c.__setitem__(key, value))
            out[f"{family}:config_{name}"] = (family, target, {})
    target = workdir / "gpt2__tokenizer_larger_than_vocab"
    shutil.copytree(valid["gpt2"], target)
    tok = json.loads((target / "tokenizer.json").read_text())
    tok["model"]["vocab"].update({f"w{i}": 4 + i for i in range(6)})
    (target / "tokenizer.json").write_text(json.dumps(tok))
    out["gpt2:tokenizer_larger_than_vocab"] = ("gpt2", target, {})
    return out


def edit_config_entry(path: Path, key: str, value) -> None:
    meta = json.loads((path / "digits.json").read_text())
    meta["models"]["vit"][key] = value
    (path / "digits.json").write_text(json.dumps(meta))


# ----------------------------------------------------------------------------------------------------------- worker
def _timeout(signum, frame):
    raise TimeoutError(f"no answer within {TIME_LIMIT_S} s")


def main(workdir: Path) -> dict:
    import warnings

    import torch

    torch.set_num_threads(1)
    all_cases = cases(workdir)
    for family in FAMILIES:  # warm up: imports and one successful load per family
        load(family, workdir / f"valid_{family}")
    signal.signal(signal.SIGALRM, _timeout)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    results = {}
    for case, (family, path, kwargs) in all_cases.items():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        start = time.perf_counter()
        signal.alarm(TIME_LIMIT_S)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                load(family, path, **kwargs)
            kind, message = None, ""
        except BaseException as exc:
            kind, message = type(exc).__name__, str(exc)
        finally:
            signal.alarm(0)
        results[case] = {
            "error": kind,
            "message": message,
            "seconds": time.perf_counter() - start,
            "peak_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
        }
    # Loading into an existing model: every file-level fault refused, and the model left exactly as it was.
    from attnkit.io import load_checkpoint
    from attnkit.models import BertModel
    from attnkit.models.bert import hf_bert_key

    model = BertModel.from_pretrained(workdir / "valid_bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for case, (family, path, _) in all_cases.items():
        if family != "bert" or case.startswith("bert:config") or case.endswith("larger_than_vocab"):
            continue  # config faults do not concern weights loaded into a built model
        signal.alarm(TIME_LIMIT_S)
        try:
            load_checkpoint(model, path, lambda n: hf_bert_key(n, has_prefix=False), nonfinite="error")
            kind, message = None, ""
        except BaseException as exc:  # what escapes is the point
            kind, message = type(exc).__name__, str(exc)
        finally:
            signal.alarm(0)
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        results["into" + case[len("bert") :]] = {
            "error": kind,
            "message": message,
            "seconds": 0.0,
            "peak_growth_kib": 0,
            "unchanged": unchanged,
        }
    return {
        "cases": results,
        "total_peak_growth_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline,
        "pickle_ran": (workdir / MARKER).exists(),
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
