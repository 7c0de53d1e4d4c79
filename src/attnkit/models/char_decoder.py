"""A small character-level decoder-only transformer, and the loader of the one shipped in ``attnkit/data``.

:class:`CharDecoder` is a GPT-style stack built from attnkit's own modules: a character embedding, pre-norm
:class:`attnkit.nn.TransformerEncoderLayer` blocks run with ``is_causal=True`` (RoPE, Su et al. 2021, so there is
no position table and left padding does not change the scores), a final LayerNorm and a linear head. Decoding
uses one :class:`attnkit.nn.KVCache` per layer (:meth:`CharDecoder.new_cache`).

The shipped weights (``char_decoder.safetensors``) were trained by ``scripts/train_char_decoder.py`` on Python's
own language reference (``pydoc_data.topics``); ``char_decoder.json`` records the config, training time and the
held-out bits per character. :func:`load_char_decoder` rebuilds the model from that record.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.data import DATA_DIR
from attnkit.io.checkpoint import CheckpointError, file_in, layer_count, load_from_header, read_header, read_json
from attnkit.nn.encoder_layer import TransformerEncoderLayer
from attnkit.nn.kv_cache import KVCache
from attnkit.nn.rotary import RotaryEmbedding

__all__ = [
    "CHARS",
    "CHAR_DECODER_CONFIG",
    "CHAR_DECODER_METADATA",
    "PAD_ID",
    "UNK_ID",
    "CharDecoder",
    "bits_per_char",
    "decode_chars",
    "encode_chars",
    "load_char_decoder",
    "load_char_decoder_metadata",
]

CHAR_DECODER_METADATA = "char_decoder.json"

PAD_ID, UNK_ID = 0, 1
#: The characters with their own id (ids 2, 3, ...): newline and printable ASCII. Anything else is ``UNK_ID``.
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i + 2 for i, c in enumerate(CHARS)}

#: Constructor arguments of the shipped model.
CHAR_DECODER_CONFIG: dict[str, Any] = {
    "vocab_size": len(CHARS) + 2,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "ffn_dim": 192,
}


def encode_chars(text: str) -> list[int]:
    """Token ids of ``text``, one per character (characters outside :data:`CHARS` become ``UNK_ID``)."""
    if not isinstance(text, str):
        raise TypeError(f"encode_chars: expected text to be a str, got {type(text).__name__}")
    return [_INDEX.get(c, UNK_ID) for c in text]


def decode_chars(ids) -> str:
    """The characters of ``ids`` (``PAD_ID`` dropped, ``UNK_ID`` shown as U+FFFD)."""
    out = []
    for i in torch.as_tensor(ids).reshape(-1).tolist():
        if i == PAD_ID:
            continue
        out.append(CHARS[i - 2] if 2 <= i < len(CHARS) + 2 else "\ufffd")
    return "".join(out)


class CharDecoder(nn.Module):
    """Decoder-only character transformer: ``lm_head(norm(blocks(embed(ids))))`` with causal self-attention.

    Submodules (stable names): ``embed`` (``nn.Embedding(V, E)``), ``layers`` (pre-norm
    :class:`TransformerEncoderLayer` blocks with RoPE), ``norm`` (``nn.LayerNorm(E)``), ``lm_head``
    (``nn.Linear(E, V, bias=False)``).

    Args:
        vocab_size: ``V`` (default ``len(CHARS) + 2``: pad, unknown, the characters).
        embed_dim: ``E``.
        depth: number of blocks.
        num_heads: ``H``; ``E / H`` must be even (RoPE).
        ffn_dim: feed-forward width.
        dropout: residual dropout, training only.
        device, dtype: of the parameters.

    Raises:
        ValueError: invalid sizes (from the layers).
    """

    def __init__(
        self,
        vocab_size: int = len(CHARS) + 2,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        ffn_dim: int = 192,
        *,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"CharDecoder: expected depth to be a positive int, got {depth!r}")
        self.embed = nn.Embedding(vocab_size, embed_dim, **factory)
        rope = RotaryEmbedding(embed_dim // num_heads)
        self.layers = nn.ModuleList(
            TransformerEncoderLayer(
                embed_dim, num_heads, ffn_dim=ffn_dim, dropout=dropout, norm_first=True, rope=rope, **factory
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, **factory)
        self.lm_head = nn.Linear(embed_dim, vocab_size, bias=False, **factory)

    def get_input_embeddings(self) -> nn.Embedding:
        """The token embedding (as Hugging Face models name it)."""
        return self.embed

    def new_cache(self) -> list[KVCache]:
        """One empty :class:`KVCache` per layer, for :meth:`forward`'s ``cache``."""
        return [KVCache() for _ in self.layers]

    def forward(
        self,
        input_ids: Tensor | None = None,
        *,
        inputs_embeds: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: list[KVCache] | None = None,
    ) -> Tensor:
        """Next-character logits.

        Args:
            input_ids: ``(B, L)`` long token ids; or pass ``inputs_embeds``.
            inputs_embeds: ``(B, L, E)`` embeddings instead of ``input_ids``.
            attention_mask: ``(B, Lk)`` with 1 (or True) for real tokens and 0 for padding (Hugging Face's
                convention), ``Lk`` = cached + new positions; default all real.
            cache: from :meth:`new_cache`; the new positions' keys and values are appended and attend to the
                cached ones (incremental decoding; outputs equal those of one call over the whole sequence).

        Returns:
            ``(B, L, V)`` logits for the character after each position.

        Raises:
            ValueError: neither or both of ``input_ids`` and ``inputs_embeds``; a cache of the wrong length; an
                ``attention_mask`` of the wrong shape.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("CharDecoder: pass exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(f"CharDecoder: expected a cache of {len(self.layers)} KVCache, got {len(cache)}")
        key_padding_mask = None
        if attention_mask is not None:
            total = x.shape[1] + (len(cache[0]) if cache is not None else 0)
            if attention_mask.shape != (x.shape[0], total):
                raise ValueError(
                    f"CharDecoder: expected attention_mask of shape (B, cached + L) = ({x.shape[0]}, {total}), "
                    f"got {tuple(attention_mask.shape)}"
                )
            key_padding_mask = ~attention_mask.bool()
        for i, layer in enumerate(self.layers):
            kv = cache[i] if cache is not None else None
            x = layer(x, key_padding_mask=key_padding_mask, is_causal=True, kv_cache=kv)
        return self.lm_head(self.norm(x))


def load_char_decoder_metadata(directory: str | Path | None = None) -> dict[str, Any]:
    """The training record ``char_decoder.json`` in ``directory`` (default: the shipped one).

    Raises:
        FileNotFoundError: no record there (train with ``scripts/train_char_decoder.py``).
        CheckpointError: not a regular file, or not a small JSON object.
    """
    path = Path(DATA_DIR if directory is None else directory) / CHAR_DECODER_METADATA
    if not path.exists():
        raise FileNotFoundError(
            f"char decoder: no {CHAR_DECODER_METADATA} in {str(path.parent)!r}; train with "
            "scripts/train_char_decoder.py"
        )
    return read_json(path, what="char decoder")


def load_char_decoder(*, directory: str | Path | None = None, nonfinite: str = "warn") -> CharDecoder:
    """Rebuild the trained :class:`CharDecoder` from its recorded config and load its weights, in eval mode.

    The config is checked against the safetensors header and the model built on the ``meta`` device before
    anything is allocated; the weights file must be a regular file inside ``directory`` (read with safetensors).

    Args:
        directory: where ``char_decoder.json`` and the weights are; default the package's ``attnkit/data``.
        nonfinite: weights holding NaN or inf: ``"warn"`` (default), ``"error"`` or ``"ignore"``.

    Returns:
        the model (float32, CPU, ``eval()``).

    Raises:
        FileNotFoundError: missing record or weights; CheckpointError (a ``ValueError``): a malformed record, a
        bad config, or weights that do not fit it (all listed).
    """
    directory = Path(DATA_DIR if directory is None else directory)
    meta = load_char_decoder_metadata(directory)
    source = f"char decoder in {str(directory)!r}"
    config = meta.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: {CHAR_DECODER_METADATA} needs a 'config' object")
    weights = file_in(directory, meta.get("weights"), f"{source}: weights file")
    header = read_header(directory, [weights])
    have = layer_count(header, "layers.")
    if config.get("depth") != have:
        raise CheckpointError(
            f"{source}: the config asks for depth={config.get('depth')!r:.40}, the weights hold {have} layers"
        )
    try:
        with torch.device("meta"):
            model = CharDecoder(**copy.deepcopy(config))
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{source}: {CHAR_DECODER_METADATA} describes an invalid model: {err}") from None
    load_from_header(
        model, directory, header, lambda n: n, nonfinite=nonfinite, source=f"{source}, weights", files=[weights]
    )
    return model.eval()


@torch.no_grad()
def bits_per_char(model: CharDecoder, text: str, *, context: int = 128, batch_size: int = 64) -> float:
    """Bits per character of ``model`` on ``text``: the mean of ``-log2 p(c_i | previous)`` over every
    character but the first of each window, ``text`` cut into consecutive windows of ``context + 1``
    characters that overlap by one (each character is predicted once, from the characters before it in its
    window).

    Raises:
        ValueError: ``text`` shorter than two characters, or ``context < 1``.
    """
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"bits_per_char: expected context to be a positive int, got {context!r}")
    ids = torch.tensor(encode_chars(text), dtype=torch.long)
    if len(ids) < 2:
        raise ValueError(f"bits_per_char: expected at least two characters, got {len(ids)}")
    windows = [ids[i : i + context + 1] for i in range(0, len(ids) - 1, context)]
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        chunk = windows[start : start + batch_size]
        lengths = torch.tensor([len(w) for w in chunk])
        batch = nn.utils.rnn.pad_sequence(chunk, batch_first=True, padding_value=PAD_ID)
        logits = model(batch[:, :-1]).double()
        nll = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none")
        valid = (torch.arange(batch.shape[1] - 1)[None, :] < (lengths - 1)[:, None]).flatten()
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return total / count / math.log(2)
