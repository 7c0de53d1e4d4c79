"""Token importance for text models: which tokens the summarising token draws on, by four methods."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.text.models import TextModel

METHODS = ("raw", "rollout", "flow", "relevance")


def summary_index(attention_mask: Tensor, which: str) -> Tensor:
    """``(B,)`` index of the summarising token: 0, or the last real token."""
    if which == "first":
        return torch.zeros(attention_mask.shape[0], dtype=torch.long)
    return attention_mask.long().sum(-1) - 1


def capture_maps(
    tm: TextModel, batch: dict[str, Tensor], *, plan=None, kernel: str = "model"
) -> tuple[list[Tensor], Tensor]:
    """Per-layer self-attention probabilities ``[(B, H, L, L)]`` and the last hidden states.

    ``plan``: :func:`attnkit.explain.capture_plan` of ``tm.model``, for a model captured many times; ``kernel``:
    :func:`attnkit.explain.capture`'s (``"math"``: the forward's own probabilities, no recomputation).
    """
    from attnkit.explain import capture

    with torch.inference_mode(), capture(tm.model, plan=plan, kernel=kernel) as rec:
        hidden = tm.forward(batch)
    return [m.weights.float() for m in rec.maps if m.is_self], hidden


def token_scores(
    tm: TextModel,
    batch: dict[str, Tensor],
    *,
    method: str = "rollout",
    layer: int | None = None,
    head: int | None = None,
    maps: list[Tensor] | None = None,
) -> Tensor:
    """Importance of each token for the summarising token, ``(B, L)``; padding gets 0, rows sum to about 1.

    ``raw``: the attention row of the summarising token in ``layer`` (default last), ``head`` (default mean).
    ``rollout`` / ``flow``: Abnar & Zuidema 2020 over all layers. ``relevance``: Chefer et al. 2021 with the
    target ``||pooled representation||`` (mean of the real tokens' last hidden states), which explains the
    sentence embedding itself.

    Raises:
        ValueError: unknown method, or ``layer`` / ``head`` out of range.
    """
    from attnkit import explain

    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    mask = batch["attention_mask"].bool()
    rows = summary_index(mask, tm.summary_row)
    if method == "relevance":
        result = explain.relevance(tm.model, batch, target=lambda out: _pooled_norm(out, mask))
        full = result.get().float()
        return _masked_rows(full, rows, mask)
    if maps is None:
        maps, _ = capture_maps(tm, batch)
    if method == "raw":
        n_layers, n_heads = len(maps), maps[0].shape[1]
        layer = n_layers - 1 if layer is None else layer
        if not -n_layers <= layer < n_layers:
            raise ValueError(f"layer must be in [0, {n_layers}) for this model, got {layer}")
        if head is not None and not 0 <= head < n_heads:
            raise ValueError(f"head must be in [0, {n_heads}) for this model, got {head}")
        m = maps[layer]
        full = m.mean(1) if head is None else m[:, head]
        return _masked_rows(full, rows, mask)
    if method == "rollout":
        return _masked_rows(explain.rollout(maps), rows, mask)
    flows = []
    for b in range(mask.shape[0]):  # flow per sequence, on its real tokens only
        n = int(mask[b].sum())
        per = [m[b : b + 1, :, :n, :n] for m in maps]
        row = int(rows[b])
        flow = explain.attention_flow(per, rows=[row], solver="scipy")[0, 0].float()
        flows.append(torch.nn.functional.pad(flow, (0, mask.shape[1] - n)))
    scores = torch.stack(flows)
    return scores / scores.sum(-1, keepdim=True).clamp_min(1e-12)


def _pooled_norm(output, mask: Tensor) -> Tensor:
    hidden = output if isinstance(output, Tensor) else output.last_hidden_state
    m = mask.to(hidden.dtype).unsqueeze(-1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    return pooled.norm(dim=-1)


def _masked_rows(full: Tensor, rows: Tensor, mask: Tensor) -> Tensor:
    picked = full[torch.arange(full.shape[0]), rows]  # (B, L)
    return picked * mask.to(picked.dtype)


def top_tokens(tokens: list[str], scores: Tensor, k: int = 8, skip_special: bool = True) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring tokens (special tokens like [CLS]/[SEP] skipped), highest first."""
    special = {"[CLS]", "[SEP]", "[PAD]", "<|endoftext|>"}
    pairs = [(t, float(s)) for t, s in zip(tokens, scores.tolist()) if not (skip_special and t in special)]
    return sorted(pairs, key=lambda p: -p[1])[:k]
