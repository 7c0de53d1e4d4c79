"""Report sections the CLI assembles from attnkit's public API (``attnkit.explain.report`` writes the page)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from attnkit.cli.registry import UserError

SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "<|endoftext|>"})
CAUSAL_NOTE = " Causal model: each token attends only to itself and earlier tokens, so the upper triangle is empty."


def text_sections(tm, batch: dict[str, Tensor], maps: list[Tensor], scores: Tensor, texts: Sequence[str], method: str):
    """Sections for a text explanation: token heatmaps, a top-token table, a layer x head browser per text."""
    from attnkit.explain import plots
    from attnkit.explain.report import HeadMaps, Section
    from attnkit.text import top_tokens

    mask = batch["attention_mask"].bool()
    tokens = [tm.tokens(batch["input_ids"][b][mask[b]]) for b in range(len(texts))]
    shown = scores.clone()  # special tokens ([CLS] keeps most of its own rollout) would wash out the colours
    for b, toks in enumerate(tokens):
        for i, tok in enumerate(toks):
            if tok in SPECIAL_TOKENS:
                shown[b, i] = 0.0
    fig = plots.token_heatmaps(tokens, shown, titles=[f"{method}: {t}" for t in texts])
    rows = [
        [t, ", ".join(f"{tok} ({s:.3f})" for tok, s in top_tokens(tokens[b], scores[b], k=6))]
        for b, t in enumerate(texts)
    ]
    where = "[CLS]" if tm.summary_row == "first" else "the last token"
    sections = [
        Section(
            f"Token importance ({method})",
            text=f"How much each token contributes to the summarising token ({where}), by {method}. Darker = more.",
            table=rows,
            table_header=["text", "top tokens"],
            figures=[fig],
        )
    ]
    stacked = torch.stack(maps)  # (layers, B, H, L, L)
    for b, text in enumerate(texts):
        n = int(mask[b].sum())
        keep = mask[b].nonzero().squeeze(-1)
        per = stacked[:, b][:, :, keep][:, :, :, keep]  # (layers, H, n, n)
        sections.append(
            Section(
                f"Attention maps: {text}",
                text="Pick a layer and a head (or their mean); rows are queries, columns keys. Hover for values."
                + (CAUSAL_NOTE if tm.is_causal else ""),
                head_maps=HeadMaps(
                    per, query_tokens=tokens[b][:n], layer_names=[f"layer {i}" for i in range(len(maps))]
                ),
            )
        )
    return sections


def write_report(path: Path, sections, *, title: str, overwrite: bool) -> Path:
    """Write the page, turning an existing file into a one-line user error."""
    from attnkit.explain.report import report

    try:
        return report(path, sections, title=title, overwrite=overwrite)
    except FileExistsError:
        raise UserError(f"{path} exists; pass --overwrite to replace it") from None


def text_report(tm, batch, maps, scores, texts, *, method: str, out: Path, overwrite: bool) -> Path:
    """The ``explain-text --out`` page."""
    sections = text_sections(tm, batch, maps, scores, texts, method)
    return write_report(out, sections, title=f"attnkit explain-text: {tm.name}", overwrite=overwrite)


def generation_report(name: str, matrices, texts, *, method: str, out: Path, overwrite: bool) -> Path:
    """The ``explain-text --generate --out`` page: one token-by-token matrix per prompt."""
    from attnkit.explain.report import Section

    sections = [
        Section(
            f"{text}",
            text=f"Rows: the generated tokens; columns: the prompt and earlier tokens each was generated from "
            f"({method}, computed step by step with the KV cache). Each row is shaded relative to its largest "
            "absolute score: blue positive, red negative; hover a cell for its value.",
            token_matrix=m,
        )
        for text, m in zip(texts, matrices)
    ]
    return write_report(out, sections, title=f"attnkit explain-text --generate: {name}", overwrite=overwrite)
