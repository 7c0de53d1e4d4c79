"""A word in context: where it attends in every layer and head, and how its embedding moves with the context.

The classic probe for contextual models: the same word ("bank") in two sentences with different senses. The
attention rows of the word show which context tokens each head mixes into it; the cosine similarity of its
hidden states in the two sentences, layer by layer, shows where the senses separate (Ethayarajh 2019, "How
Contextual are Contextualized Word Representations?", measures the same self-similarity).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.text.models import TextModel

__all__ = ["WordInContext", "find_word", "layer_similarity", "word_in_context"]


@dataclass
class WordInContext:
    """The attention of one word of one sentence.

    Attributes:
        text: the sentence.
        tokens: its tokens (with special tokens).
        index: position of the word's first sub-token.
        attention: ``(layers, H, L)`` float32: row ``index`` of every layer's and head's attention map.
        hidden: ``(layers + 1, E)`` float32 hidden state of the word after the embeddings and after each layer.
    """

    text: str
    tokens: list[str]
    index: int
    attention: Tensor
    hidden: Tensor

    def top(
        self, layer: int, k: int = 3, head: int | None = None, skip: tuple[str, ...] = ()
    ) -> list[tuple[str, float]]:
        """The ``k`` tokens the word attends to most in ``layer`` (``head`` or the mean of heads).

        ``skip`` lists tokens to leave out (e.g. ``("[CLS]", "[SEP]")``, which many heads use as a no-op sink).
        """
        row = self.attention[layer].mean(0) if head is None else self.attention[layer, head]
        order = torch.argsort(row, descending=True).tolist()
        picked = [i for i in order if self.tokens[i] not in skip][:k]
        return [(self.tokens[i], float(row[i])) for i in picked]


def find_word(tokens: list[str], word: str) -> int:
    """Index of the first token equal to ``word`` (case-insensitive, WordPiece/BPE markers ignored).

    Raises:
        ValueError: the word is not a single token of the sentence (the message lists the tokens).
    """
    target = word.lower()
    for i, tok in enumerate(tokens):
        if tok.lstrip("Ġ▁").removeprefix("##").lower() == target:
            return i
    raise ValueError(f"the word {word!r} is not a token of the sentence; tokens: {tokens}")


def word_in_context(tm: TextModel, text: str, word: str) -> WordInContext:
    """Run ``text`` through a BERT-family model and collect ``word``'s attention rows and hidden states.

    Raises:
        ValueError: the word is not a token of the text, or the model is not BERT-family (hidden states per
            layer are read from attnkit's :class:`~attnkit.models.BertModel` layers).
    """
    from attnkit.explain import capture

    if tm.family != "bert":
        raise ValueError("word_in_context needs a BERT-family model loaded into attnkit.models.BertModel")
    batch = tm.encode([text])
    tokens = tm.tokens(batch["input_ids"][0])
    index = find_word(tokens, word)
    states: list[Tensor] = []
    hooks = [tm.model.embeddings.register_forward_hook(lambda m, a, out: states.append(out[0, index]))]
    hooks += [layer.register_forward_hook(lambda m, a, out: states.append(out[0, index])) for layer in tm.model.layers]
    try:
        with torch.inference_mode(), capture(tm.model, query_rows=[index]) as rec:
            tm.forward(batch)
    finally:
        for h in hooks:
            h.remove()
    attention = torch.stack([m.weights[0, :, 0] for m in rec.maps if m.is_self]).float()  # (layers, H, L)
    return WordInContext(text, tokens, index, attention, torch.stack(states).float())


def layer_similarity(a: WordInContext, b: WordInContext) -> Tensor:
    """Cosine similarity of the word's hidden states in ``a`` and ``b``, after the embeddings and each layer."""
    return torch.nn.functional.cosine_similarity(a.hidden, b.hidden, dim=-1)
