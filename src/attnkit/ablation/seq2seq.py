"""Character-level encoder-decoders for the date task: GRU without attention, with Bahdanau or Luong attention,
and a small Transformer.

All models share one interface: ``forward(src, src_lengths, tgt_in)`` returns teacher-forced logits, and
``generate(src, src_lengths, steps)`` decodes greedily and returns the tokens and, for the attentive models, the
alignment weights (target steps x source characters). Token ids follow :mod:`attnkit.ablation.dates` (``PAD`` = 0,
``BOS`` = 1).

The three recurrent models share the encoder (embedding + bidirectional GRU, annotations ``h_j`` of width
``2 · hidden_dim``, Bahdanau et al. 2015, Sec. 3.2), the decoder width and the initial state
``s_0 = tanh(W_init [h→_S; h←_1])``; they differ only in how the decoder reads the source:

* ``"none"``: the RNN encoder-decoder of Cho et al. 2014 (EMNLP, Sec. 2.2): one fixed summary ``c = [h→_S; h←_1]``
  feeds every decoder step, ``s_i = GRU([y_{i-1}; c], s_{i-1})``, ``p(y_i) = softmax(W_o [s_i; c; y_{i-1}])``;
* ``"additive"``: Bahdanau et al. 2015 (ICLR, Eq. 4-6): ``c_i = Σ_j α_ij h_j`` with
  ``α = softmax(vᵀ tanh(W s_{i-1} + U h_j))`` (:class:`attnkit.nn.AdditiveAttention`), then
  ``s_i = GRU([y_{i-1}; c_i], s_{i-1})``, ``p(y_i) = softmax(W_o [s_i; c_i; y_{i-1}])`` (a linear output layer
  instead of the paper's maxout);
* ``"luong"``: Luong et al. 2015 (EMNLP, Sec. 3.1 and 3.3), global attention with the ``general`` score and
  input feeding: ``h_t = GRU([y_{t-1}; h̃_{t-1}], h_{t-1})``, ``c_t`` from :class:`attnkit.nn.LuongAttention`
  on ``h_t``, ``h̃_t = tanh(W_c [c_t; h_t])``, ``p(y_t) = softmax(W_s h̃_t)`` (a GRU instead of the paper's LSTM).

``"transformer"`` is the encoder-decoder of Vaswani et al. 2017 (Sec. 3) built from
:class:`attnkit.nn.TransformerEncoderLayer` / :class:`~attnkit.nn.TransformerDecoderLayer` (post-norm), embeddings
scaled by ``sqrt(E)`` plus sinusoidal positions (Sec. 3.4-3.5), which extend to lengths not seen in training.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from attnkit.ablation.dates import BOS, PAD
from attnkit.nn import (
    AdditiveAttention,
    LuongAttention,
    SinusoidalPositionalEncoding,
    TransformerDecoderLayer,
    TransformerEncoderLayer,
)

__all__ = ["SEQ2SEQ_MODELS", "GRUSeq2Seq", "Generation", "TransformerSeq2Seq", "build_seq2seq"]

#: Model names accepted by :func:`build_seq2seq`, in report order.
SEQ2SEQ_MODELS = ("none", "additive", "luong", "transformer")


class Generation(NamedTuple):
    """Greedy decoding output: ``tokens`` ``(B, T)`` int64; ``alignments`` ``(B, T, S)`` float32 or ``None``.

    ``alignments[b, t, j]`` is the weight of source character ``j`` when emitting target token ``t`` (rows sum to
    1 over the real characters; padded positions get 0). For the Transformer it is the last decoder layer's
    cross-attention averaged over heads.
    """

    tokens: Tensor
    alignments: Tensor | None


def _padding_mask(src_lengths: Tensor, length: int) -> Tensor:
    """``(B, S)`` bool, **True = a real character** (the attnkit "may attend" convention)."""
    return torch.arange(length, device=src_lengths.device)[None, :] < src_lengths[:, None]


class GRUSeq2Seq(nn.Module):
    """Bidirectional-GRU encoder and GRU decoder, without attention or with Bahdanau / Luong attention.

    Args:
        source_vocab: source vocabulary size (ids ``< source_vocab``, ``0`` = padding).
        target_vocab: target vocabulary size (``1`` = ``BOS``).
        attention: ``"none"``, ``"additive"`` (Bahdanau) or ``"luong"`` (general score, input feeding).
        embed_dim: character embedding width; default 32.
        hidden_dim: GRU width (the encoder has two directions of it); default 64.

    Shape:
        ``src`` ``(B, S)`` int64 right-padded, ``src_lengths`` ``(B,)`` int64 in ``[1, S]``, ``tgt_in``
        ``(B, T)`` int64 starting with ``BOS`` -> logits ``(B, T, target_vocab)``.

    Raises:
        ValueError: an unknown ``attention`` (the valid ones are listed) or non-positive sizes.

    References:
        Cho et al. 2014, "Learning Phrase Representations using RNN Encoder-Decoder"; Bahdanau et al. 2015,
        "Neural Machine Translation by Jointly Learning to Align and Translate"; Luong et al. 2015, "Effective
        Approaches to Attention-based Neural Machine Translation".
    """

    def __init__(
        self,
        source_vocab: int,
        target_vocab: int,
        *,
        attention: str = "none",
        embed_dim: int = 32,
        hidden_dim: int = 64,
    ) -> None:
        super().__init__()
        if attention not in ("none", "additive", "luong"):
            raise ValueError(f"GRUSeq2Seq: unknown attention {attention!r}; valid: 'none', 'additive', 'luong'")
        for name, val in (
            ("source_vocab", source_vocab),
            ("target_vocab", target_vocab),
            ("embed_dim", embed_dim),
            ("hidden_dim", hidden_dim),
        ):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"GRUSeq2Seq: expected {name} to be a positive int, got {val!r}")
        self.attention_name, self.hidden_dim = attention, hidden_dim
        annot = 2 * hidden_dim
        self.src_embed = nn.Embedding(source_vocab, embed_dim, padding_idx=PAD)
        self.encoder = nn.GRU(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.init_state = nn.Linear(annot, hidden_dim)
        self.tgt_embed = nn.Embedding(target_vocab, embed_dim)
        if attention == "luong":
            self.cell = nn.GRUCell(embed_dim + hidden_dim, hidden_dim)
            self.attn = LuongAttention(hidden_dim, annot, score="general")
            self.combine = nn.Linear(annot + hidden_dim, hidden_dim, bias=False)  # W_c
            self.out = nn.Linear(hidden_dim, target_vocab)  # W_s
        else:
            self.cell = nn.GRUCell(embed_dim + annot, hidden_dim)
            self.attn = AdditiveAttention(hidden_dim, annot) if attention == "additive" else None
            self.out = nn.Linear(hidden_dim + annot + embed_dim, target_vocab)

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Annotations ``(B, S, 2·hidden_dim)`` (0 at padding) and the summary ``[h→_last; h←_first]``."""
        packed = nn.utils.rnn.pack_padded_sequence(
            self.src_embed(src), src_lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, last = self.encoder(packed)  # last: (2, B, hidden)
        annotations, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        return annotations, torch.cat([last[0], last[1]], dim=-1)

    def _step(self, y_prev: Tensor, state: tuple, memory: Tensor, keep: Tensor, summary: Tensor):
        """One decoder step: ``(logits (B, V), new state, alignment (B, S) or None)``."""
        s, feed = state
        emb = self.tgt_embed(y_prev)  # (B, embed)
        if self.attention_name == "luong":
            s = self.cell(torch.cat([emb, feed], -1), s)
            context, weights = self.attn(s[:, None], memory, attn_mask=keep[:, None, :])  # (B, 1, 2h), (B, 1, S)
            feed = torch.tanh(self.combine(torch.cat([context[:, 0], s], -1)))  # h̃_t
            return self.out(feed), (s, feed), weights[:, 0]
        if self.attn is not None:
            context, weights = self.attn(s[:, None], memory, attn_mask=keep[:, None, :])
            context, weights = context[:, 0], weights[:, 0]
        else:
            context, weights = summary, None
        s = self.cell(torch.cat([emb, context], -1), s)
        return self.out(torch.cat([s, context, emb], -1)), (s, feed), weights

    def _start(self, src: Tensor, src_lengths: Tensor):
        memory, summary = self.encode(src, src_lengths)
        s0 = torch.tanh(self.init_state(summary))
        feed = s0.new_zeros(s0.shape[0], self.hidden_dim)
        return memory, summary, _padding_mask(src_lengths, src.shape[1]), (s0, feed)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, target_vocab)`` for target inputs ``tgt_in`` ``(B, T)``."""
        memory, summary, keep, state = self._start(src, src_lengths)
        logits = []
        for t in range(tgt_in.shape[1]):
            step_logits, state, _ = self._step(tgt_in[:, t], state, memory, keep, summary)
            logits.append(step_logits)
        return torch.stack(logits, 1)

    def generate(self, src: Tensor, src_lengths: Tensor, steps: int, *, with_alignments: bool = False) -> Generation:
        """Greedy decoding of ``steps`` tokens after ``BOS``: :class:`Generation` (alignments ``None`` without
        attention or unless ``with_alignments``)."""
        memory, summary, keep, state = self._start(src, src_lengths)
        y = torch.full((src.shape[0],), BOS, dtype=torch.int64, device=src.device)
        tokens, weights = [], []
        for _ in range(steps):
            step_logits, state, w = self._step(y, state, memory, keep, summary)
            y = step_logits.argmax(-1)
            tokens.append(y)
            weights.append(w)
        align = torch.stack(weights, 1).float() if with_alignments and self.attn is not None else None
        return Generation(torch.stack(tokens, 1), align)


class TransformerSeq2Seq(nn.Module):
    """A small Transformer encoder-decoder over characters (Vaswani et al. 2017), on attnkit layers.

    Args:
        source_vocab: source vocabulary size (``0`` = padding).
        target_vocab: target vocabulary size (``1`` = ``BOS``).
        embed_dim: ``E``; default 48 (about the parameter count of the GRU models' defaults).
        num_heads: ``H``; default 4.
        num_layers: encoder layers and decoder layers (each); default 2.
        ffn_dim: feed-forward width; default ``2 · E``.
        dropout: residual dropout (training only); default 0.1.

    Shape:
        as :class:`GRUSeq2Seq`.

    Raises:
        ValueError: sizes the attnkit layers reject (e.g. ``embed_dim`` not a multiple of ``num_heads``, or odd,
            which the sinusoidal positions need).

    References:
        Vaswani et al., "Attention Is All You Need", NeurIPS 2017, Sec. 3.
    """

    def __init__(
        self,
        source_vocab: int,
        target_vocab: int,
        *,
        embed_dim: int = 48,
        num_heads: int = 4,
        num_layers: int = 2,
        ffn_dim: int | None = None,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        ffn_dim = 2 * embed_dim if ffn_dim is None else ffn_dim
        self.embed_dim = embed_dim
        self.src_embed = nn.Embedding(source_vocab, embed_dim, padding_idx=PAD)
        self.tgt_embed = nn.Embedding(target_vocab, embed_dim)
        self.positions = SinusoidalPositionalEncoding(embed_dim)
        opts = {"ffn_dim": ffn_dim, "dropout": dropout, "activation": "relu"}
        self.encoder = nn.ModuleList(TransformerEncoderLayer(embed_dim, num_heads, **opts) for _ in range(num_layers))
        self.decoder = nn.ModuleList(TransformerDecoderLayer(embed_dim, num_heads, **opts) for _ in range(num_layers))
        self.out = nn.Linear(embed_dim, target_vocab)
        for table in (self.src_embed, self.tgt_embed):  # N(0, 1/E), so that sqrt(E)-scaled embeddings and the
            nn.init.normal_(table.weight, std=embed_dim**-0.5)  # unit-scale positions are comparable (fairseq)
            if table.padding_idx is not None:
                nn.init.zeros_(table.weight[table.padding_idx])

    def _embed(self, table: nn.Embedding, ids: Tensor) -> Tensor:
        return self.positions(table(ids) * math.sqrt(self.embed_dim))

    def encode(self, src: Tensor, src_lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder output ``(B, S, E)`` and the padding mask ``(B, S)`` (**True = padding**)."""
        padding = ~_padding_mask(src_lengths, src.shape[1])
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, key_padding_mask=padding)
        return x, padding

    def decode(self, memory: Tensor, padding: Tensor, tgt_in: Tensor) -> Tensor:
        """Logits ``(B, T, target_vocab)`` of causal decoding over ``tgt_in`` ``(B, T)``."""
        x = self._embed(self.tgt_embed, tgt_in)
        for layer in self.decoder:
            x = layer(x, memory, is_causal=True, memory_key_padding_mask=padding)
        return self.out(x)

    def forward(self, src: Tensor, src_lengths: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher-forced logits ``(B, T, target_vocab)``."""
        memory, padding = self.encode(src, src_lengths)
        return self.decode(memory, padding, tgt_in)

    def generate(self, src: Tensor, src_lengths: Tensor, steps: int, *, with_alignments: bool = False) -> Generation:
        """Greedy decoding (the decoder re-run on the prefix at each step); with ``with_alignments``, the last
        decoder layer's cross-attention (head mean) recomputed on the final prefix (:meth:`alignments`)."""
        memory, padding = self.encode(src, src_lengths)
        prefix = torch.full((src.shape[0], 1), BOS, dtype=torch.int64, device=src.device)
        for _ in range(steps):
            y = self.decode(memory, padding, prefix)[:, -1].argmax(-1)
            prefix = torch.cat([prefix, y[:, None]], 1)
        tokens = prefix[:, 1:]
        return Generation(tokens, self.alignments(src, src_lengths, tokens) if with_alignments else None)

    def alignments(self, src: Tensor, src_lengths: Tensor, tokens: Tensor) -> Tensor:
        """``(B, T, S)`` cross-attention of the last decoder layer (head mean) when emitting ``tokens`` ``(B, T)``."""
        from attnkit.explain import capture

        tgt_in = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], 1)
        with capture(self) as rec:
            self(src, src_lengths, tgt_in)
        cross = rec.weights("cross")
        if not cross:  # pragma: no cover - depends on attnkit.explain's record kinds
            raise RuntimeError("TransformerSeq2Seq.alignments: no cross-attention was captured")
        return cross[-1].float().mean(1)


def build_seq2seq(name: str, source_vocab: int, target_vocab: int, **kwargs) -> nn.Module:
    """The model ``name`` of :data:`SEQ2SEQ_MODELS` with its default sizes (``kwargs`` override them).

    Raises:
        ValueError: an unknown name (the valid ones are listed).
    """
    if name == "transformer":
        return TransformerSeq2Seq(source_vocab, target_vocab, **kwargs)
    if name in ("none", "additive", "luong"):
        return GRUSeq2Seq(source_vocab, target_vocab, attention=name, **kwargs)
    raise ValueError(f"build_seq2seq: unknown model {name!r}; valid: {', '.join(SEQ2SEQ_MODELS)}")
