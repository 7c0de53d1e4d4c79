"""BERT encoder assembled from attnkit modules, loading Hugging Face ``BertModel`` checkpoints.

Devlin, Chang, Lee, Toutanova 2019, "BERT: Pre-training of Deep Bidirectional Transformers for Language
Understanding": token + position + segment embeddings, LayerNorm, then post-norm transformer layers with exact
GELU. Outputs match ``transformers.BertModel`` (``last_hidden_state``, ``pooler_output``) on the same weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from attnkit.io.checkpoint import (
    CheckpointError,
    layer_count,
    load_from_header,
    read_config,
    read_header,
)
from attnkit.nn.encoder_layer import TransformerEncoderLayer

__all__ = ["BertConfig", "BertModel"]

#: Hugging Face ``hidden_act`` -> name in :data:`attnkit.nn.activations.ACTIVATIONS`.
HF_ACTIVATIONS = {
    "gelu": "gelu",
    "relu": "relu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "silu": "silu",
    "swish": "silu",
}


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the architecture uses (same names and defaults).

    Attributes:
        vocab_size: token vocabulary size.
        hidden_size: ``E``.
        num_hidden_layers: number of encoder layers.
        num_attention_heads: ``H``; ``hidden_size`` must be a multiple of it.
        intermediate_size: feed-forward width.
        hidden_act: ``"gelu"`` (exact), ``"gelu_new"``, ``"relu"``, ``"silu"``, ...
        hidden_dropout_prob: residual / embedding dropout (training only).
        attention_probs_dropout_prob: attention dropout (training only).
        max_position_embeddings: longest sequence.
        type_vocab_size: number of segment (token type) ids.
        layer_norm_eps: LayerNorm epsilon.
        pad_token_id: id of the padding token (its word embedding is not special-cased at inference).
        position_embedding_type: only ``"absolute"`` is supported.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"

    @classmethod
    def from_dict(cls, config: dict) -> BertConfig:
        """Read and check the known fields of a ``config.json`` dict (others are ignored).

        Raises:
            ValueError: a field of the wrong type or out of range (sizes are integers >= 1, at most 2**31;
                probabilities in [0, 1); ``layer_norm_eps`` finite and > 0), ``hidden_size`` not a multiple of
                ``num_attention_heads``, an unsupported ``hidden_act`` or ``position_embedding_type``.
        """
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in config.items() if k in known})
        for name in _INT_FIELDS:
            value, low = getattr(out, name), 0 if name == "pad_token_id" else 1
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**31:
                raise ValueError(f"BertConfig: {name} must be an integer in [{low}, 2**31], got {value!r:.60}")
        for name in _FLOAT_FIELDS:
            value = getattr(out, name)
            bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            top = math.inf if name == "layer_norm_eps" else 1.0
            if bad or not (0 < value < top if name == "layer_norm_eps" else 0 <= value < top):
                raise ValueError(f"BertConfig: {name} must be a finite number in its range, got {value!r:.60}")
        if out.hidden_size % out.num_attention_heads:
            raise ValueError(
                f"BertConfig: hidden_size ({out.hidden_size}) must be a multiple of num_attention_heads "
                f"({out.num_attention_heads})"
            )
        if not isinstance(out.hidden_act, str) or out.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(
                f"BertConfig: unsupported hidden_act {out.hidden_act!r:.60}; valid: "
                f"{', '.join(map(repr, HF_ACTIVATIONS))}"
            )
        if out.position_embedding_type != "absolute":
            raise ValueError(
                f"BertConfig: position_embedding_type {out.position_embedding_type!r:.60} is not supported; "
                f"expected 'absolute'"
            )
        if out.pad_token_id >= out.vocab_size:
            raise ValueError(
                f"BertConfig: pad_token_id ({out.pad_token_id}) must be below vocab_size ({out.vocab_size})"
            )
        return out


_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
    "pad_token_id",
)
_FLOAT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "layer_norm_eps")


class BertEmbeddings(nn.Module):
    """``LayerNorm(word[input_ids] + token_type[token_type_ids] + position[0..L-1])``, then dropout."""

    def __init__(self, config: BertConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        e = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id, **factory)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, e, **factory)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, e, **factory)
        self.norm = nn.LayerNorm(e, eps=config.layer_norm_eps, **factory)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x + self.position_embeddings(positions)))


_LAYER_KEYS = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "output.LayerNorm": "norm2",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias|gamma|beta)$")


def hf_bert_key(name: str, *, has_prefix: bool) -> str | None:
    """Hugging Face BERT checkpoint key -> :class:`BertModel` state-dict key (``None``: not in the encoder).

    Strips the ``bert.`` prefix of task-model checkpoints (whose head weights are skipped), renames the old
    ``gamma``/``beta`` LayerNorm names, and skips the ``position_ids`` buffer.
    """
    if has_prefix:
        if not name.startswith("bert."):
            return None  # a task head (cls.*, classifier.*): not part of the encoder
        name = name[len("bert.") :]
    if name.endswith("position_ids"):
        return None
    name = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", name))
    name = name.replace("embeddings.LayerNorm.", "embeddings.norm.")
    if name.startswith("pooler.dense."):
        return "pooler." + name[len("pooler.dense.") :]
    match = _LAYER_RE.match(name)
    if match and match.group(2) in _LAYER_KEYS:
        return f"layers.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}.{match.group(3)}"
    return name


class BertModel(nn.Module):
    """A BERT encoder whose attention runs through :func:`attnkit.attention` (any backend; explainable).

    Submodules: ``embeddings`` (:class:`BertEmbeddings`), ``layers`` (``nn.ModuleList`` of post-norm
    :class:`attnkit.nn.TransformerEncoderLayer`), ``pooler`` (``nn.Linear(E, E)`` or ``None``).

    Args:
        config: a :class:`BertConfig`.
        add_pooling_layer: build the ``pooler`` (``tanh(pooler(h[:, 0]))``, see :meth:`pool`).
        backend: passed to :func:`attnkit.attention` in every layer.
        device, dtype: of the parameters.

    Raises:
        ValueError: ``hidden_size`` not a multiple of ``num_attention_heads``, an unsupported activation.

    References:
        Devlin et al. 2019; outputs match ``transformers.BertModel`` with the same weights.

    Example:
        >>> import torch
        >>> config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
        ...                     intermediate_size=32)
        >>> model = BertModel(config).eval()
        >>> model(torch.tensor([[2, 7, 9, 0]]), attention_mask=torch.tensor([[1, 1, 1, 0]])).shape
        torch.Size([1, 4, 16])
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        add_pooling_layer: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(config, BertConfig):
            raise TypeError(f"BertModel: expected a BertConfig, got {type(config).__name__}")
        if config.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(
                f"BertModel: unsupported hidden_act {config.hidden_act!r}; valid: "
                f"{', '.join(map(repr, HF_ACTIVATIONS))}"
            )
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.embeddings = BertEmbeddings(config, **factory)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                config.hidden_size,
                config.num_attention_heads,
                ffn_dim=config.intermediate_size,
                dropout=config.hidden_dropout_prob,
                attn_drop=config.attention_probs_dropout_prob,
                activation=HF_ACTIVATIONS[config.hidden_act],
                norm_first=False,
                layer_norm_eps=config.layer_norm_eps,
                backend=backend,
                **factory,
            )
            for _ in range(config.num_hidden_layers)
        )
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size, **factory) if add_pooling_layer else None

    @property
    def backend(self) -> str:
        """The attention backend of every layer; assign a name to switch all of them."""
        return self.layers[0].self_attn.backend if len(self.layers) else "auto"

    @backend.setter
    def backend(self, name: str) -> None:
        for layer in self.layers:
            layer.self_attn.backend = name

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, token_type_ids: Tensor | None = None
    ) -> Tensor:
        """Encode a batch of token ids.

        Args:
            input_ids: ``(B, L)`` int64 token ids, ``L <= max_position_embeddings``.
            attention_mask: ``(B, L)``, **1 (or True) = real token**, 0 = padding (transformers' convention);
                default all real. Padding positions still get (meaningless) hidden states, as in transformers.
            token_type_ids: ``(B, L)`` segment ids; default 0.

        Returns:
            ``(B, L, hidden_size)`` last hidden states.

        Raises:
            TypeError: ``input_ids`` is not an integer tensor.
            ValueError: wrong ranks or shapes, or ``L > max_position_embeddings``.
        """
        if not isinstance(input_ids, Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise TypeError("BertModel: expected input_ids to be an integer tensor of shape (B, L)")
        if input_ids.ndim != 2:
            raise ValueError(f"BertModel: expected input_ids of shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"BertModel: sequence length {input_ids.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}"
            )
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(
                    f"BertModel: expected {name} of shape {tuple(input_ids.shape)} like input_ids, got {tuple(t.shape)}"
                )
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        mask = None
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            # One additive mask (B, 1, 1, L) in the compute dtype for all layers: 0 = attend, -inf = padding.
            keep = attention_mask.bool()[:, None, None, :]
            mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device).masked_fill_(~keep, float("-inf"))
        for layer in self.layers:
            x = layer(x, attn_mask=mask)
        return x

    def pool(self, last_hidden_state: Tensor) -> Tensor:
        """BERT's pooled output ``tanh(pooler(h[:, 0]))`` (transformers' ``pooler_output``), ``(B, E)``.

        Raises:
            RuntimeError: the model was built with ``add_pooling_layer=False``.
        """
        if self.pooler is None:
            raise RuntimeError("BertModel.pool: this model has no pooler (add_pooling_layer=False)")
        return torch.tanh(self.pooler(last_hidden_state[:, 0]))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        backend: str = "auto",
        device=None,
        dtype: torch.dtype | None = None,
        nonfinite: str = "warn",
    ) -> BertModel:
        """Load a Hugging Face BERT checkpoint directory (``config.json`` + ``model.safetensors``).

        Keys of ``transformers.BertModel`` checkpoints are mapped to this module; task checkpoints
        (``BertForMaskedLM``, ... with a ``bert.`` prefix) load their encoder and skip their heads. The pooler
        is built when the checkpoint has one. Weights are read with ``safetensors`` only (never pickle). The
        config is checked against the safetensors headers and the model built on the ``meta`` device before
        any memory is allocated, so a hostile ``config.json`` (``hidden_size=10**9``) fails fast.

        Args:
            path: the checkpoint directory.
            backend: attention backend for every layer.
            device: where to put the model (default CPU).
            dtype: parameter dtype (default float32); floating checkpoint tensors are cast to it.
            nonfinite: weights holding NaN or inf: ``"warn"`` (default), ``"error"`` or ``"ignore"``.

        Returns:
            the model in eval mode.

        Raises:
            FileNotFoundError, NotADirectoryError: no such directory, a file instead of a directory, or no
                ``config.json`` / ``model.safetensors`` in it.
            CheckpointError: (a ``ValueError``) an invalid config, a config that disagrees with the weights, an
                unreadable or truncated file, or tensors that are missing, unexpected, mis-shaped or of a wrong
                dtype (all listed in the message), or non-finite weights with ``nonfinite="error"``.
            ImportError: ``safetensors`` is missing (``pip install attnkit[hf]``).
        """
        source = f"checkpoint {str(path)!r}"
        try:
            config = BertConfig.from_dict(read_config(path))
        except CheckpointError:
            raise
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"{source}: config.json describes an invalid model: {err}") from None
        header = read_header(path)
        has_prefix = any(name.startswith("bert.") for name in header)

        def rename(name: str) -> str | None:
            return hf_bert_key(name, has_prefix=has_prefix)

        renamed = {rename(name): info for name, info in header.items() if rename(name) is not None}
        # Only the layer count decides how much work building costs (even on the meta device); every other
        # size is compared tensor by tensor against the meta model below.
        layers = layer_count(renamed, "layers.")
        if layers != config.num_hidden_layers:
            raise CheckpointError(
                f"{source}: config.json says num_hidden_layers={config.num_hidden_layers}, the weights hold {layers}"
            )
        try:
            model = cls(
                config, add_pooling_layer="pooler.weight" in renamed, backend=backend, device="meta", dtype=dtype
            )
        except RuntimeError as err:  # sizes overflowing even on the meta device
            raise CheckpointError(f"{source}: config.json describes an invalid model: {err}") from None
        load_from_header(model, path, header, rename, device=device, nonfinite=nonfinite, source=source)
        return model.eval()
