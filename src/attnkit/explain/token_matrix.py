"""A token-by-token attribution matrix (explained tokens x source tokens), for the report and the terminal.

:func:`attnkit.explain.report` draws it as an HTML table (labels escaped with its ``escape_html``), each row
shaded relative to its own largest absolute score (blue positive, red negative); :meth:`TokenMatrix.lines` gives
the terminal view, the strongest sources of each row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

__all__ = ["TokenMatrix", "visible_token"]

_VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5", "\r": "\u240d"}


def visible_token(token: str) -> str:
    """``token`` with whitespace made visible (space ␣, newline ↵, tab ⇥), so a one-character token shows."""
    return "".join(_VISIBLE.get(c, c) for c in str(token))


@dataclass
class TokenMatrix:
    """Attribution of each explained token (rows) to the tokens it was computed from (columns).

    Attributes:
        scores: ``(N, S)`` float scores (e.g. ``GenerationAttribution.matrix(method, b)[0]``).
        row_tokens: ``N`` labels of the explained (generated) tokens.
        column_tokens: ``S`` labels of the source tokens.
        caption: what the scores are (method, model), shown above the table.
    """

    scores: Tensor
    row_tokens: Sequence[str]
    column_tokens: Sequence[str]
    caption: str | None = None

    def check(self) -> None:
        """Raise ValueError when the shapes and labels disagree."""
        if not isinstance(self.scores, Tensor) or self.scores.ndim != 2:
            raise ValueError(
                f"TokenMatrix: scores must be an (N, S) tensor, got {getattr(self.scores, 'shape', self.scores)!r:.80}"
            )
        n, s = self.scores.shape
        for name, labels, size in (("row_tokens", self.row_tokens, n), ("column_tokens", self.column_tokens, s)):
            if len(labels) != size:
                raise ValueError(f"TokenMatrix: {name} has {len(labels)} labels, scores need {size}")

    def lines(self, top: int = 5) -> list[str]:
        """One line per row: the row token, then its ``top`` sources by absolute score, strongest first, each as
        ``token@column score``."""
        self.check()
        out = []
        for i, row in enumerate(self.scores.detach().double().cpu()):
            order = row.abs().argsort(descending=True, stable=True)[:top].tolist()
            parts = [f"{visible_token(self.column_tokens[j])}@{j} {float(row[j]):+.3f}" for j in order if row[j] != 0]
            out.append(f"{visible_token(self.row_tokens[i]):>8} <- " + "  ".join(parts))
        return out
