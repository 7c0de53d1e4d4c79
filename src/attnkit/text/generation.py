"""Text generators for generation attribution: the shipped character-level decoder, or a local Hugging Face
causal LM (GPT-2 family on ``"sdpa"``, decoder-only families on ``attn_implementation="attnkit"``).

A :class:`TextGenerator` turns prompts into left-padded ids and ids back into token strings, the two things
:func:`attnkit.explain.generation.generate_attribution` and its text view need.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["TextGenerator", "char_generator", "load_generator"]


@dataclass
class TextGenerator:
    """A decoder-only model with its tokenizer.

    Attributes:
        name: readable model name.
        model: the model (eval mode).
        encode_one: ``text -> token ids``.
        token_strings: ``ids (L,) -> L token strings``.
        vocabulary: ``token string -> id`` lookup for ``--foil`` (``None`` when the string is not one token).
        pad_id: id used for left padding.
    """

    name: str
    model: nn.Module
    encode_one: Callable[[str], list[int]]
    token_strings: Callable[[Tensor], list[str]]
    vocabulary: Callable[[str], int | None]
    pad_id: int

    def encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, both ``(B, P)`` long, left-padded.

        Raises:
            ValueError: a text with no tokens.
        """
        seqs = [self.encode_one(t) for t in texts]
        empty = [t for t, s in zip(texts, seqs) if not s]
        if empty:
            raise ValueError(f"{self.name}: the prompt {empty[0]!r:.60} has no tokens")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[b, width - len(s) :] = 1
        return ids, mask

    def token_id(self, token: str) -> int:
        """The id of one token string.

        Raises:
            ValueError: ``token`` is not a single token of the vocabulary.
        """
        found = self.vocabulary(token)
        if found is None:
            raise ValueError(f"{token!r:.40} is not a single token of {self.name}'s vocabulary")
        return found


def char_generator() -> TextGenerator:
    """The character-level decoder shipped with attnkit (:func:`attnkit.models.char_decoder.load_char_decoder`)."""
    from attnkit.models.char_decoder import CHARS, PAD_ID, decode_chars, encode_chars, load_char_decoder

    def vocabulary(token: str) -> int | None:
        return encode_chars(token)[0] if len(token) == 1 and token in CHARS else None

    return TextGenerator(
        name="char-decoder (pydoc_data)",
        model=load_char_decoder(),
        encode_one=encode_chars,
        token_strings=lambda ids: [decode_chars([i]) for i in ids.tolist()],
        vocabulary=vocabulary,
        pad_id=PAD_ID,
    )


def load_generator(path: str | Path | None, *, nonfinite: str = "warn") -> TextGenerator:
    """The shipped character decoder (``path=None``) or a local Hugging Face causal-LM checkpoint directory.

    Raises:
        TextModelError: as :func:`attnkit.text.load_text_model` with ``lm_head=True`` (a BERT checkpoint is
            refused: it cannot generate).
        ImportError: transformers/tokenizers missing for a checkpoint directory.
    """
    if path is None:
        return char_generator()
    from attnkit.text.models import load_text_model

    tm = load_text_model(path, nonfinite=nonfinite, lm_head=True)
    tok = tm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    unk = tok.unk_token_id

    def vocabulary(token: str) -> int | None:
        found = tok.convert_tokens_to_ids(token)
        if found is None or (found == unk and token != tok.unk_token):
            return None
        return int(found)

    return TextGenerator(
        name=tm.name,
        model=tm.model,
        encode_one=lambda text: tok(text, add_special_tokens=True)["input_ids"],
        token_strings=lambda ids: tok.convert_ids_to_tokens(ids.tolist()),
        vocabulary=vocabulary,
        pad_id=int(pad),
    )
