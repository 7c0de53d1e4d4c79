"""Multiplicative ("global") attention of Luong, Pham and Manning 2015, with its three score functions.

"Effective Approaches to Attention-based Neural Machine Translation", EMNLP 2015, Eq. 8:
``dot: h_tᵀ h̄_s``, ``general: h_tᵀ W_a h̄_s``, ``concat: v_aᵀ tanh(W_a [h_t; h̄_s])``; Eq. 7 normalises over
the source positions ``s`` and the context is ``c_t = Σ_s a_t(s) h̄_s``.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.nn._alignment import check_inputs, softmax_context

__all__ = ["LuongAttention"]

SCORES = ("dot", "general", "concat")


class LuongAttention(nn.Module):
    """Luong attention with the ``dot``, ``general`` or ``concat`` score (Luong et al. 2015, Eq. 8).

    ``dot`` and ``general`` are dot products, so they run through :func:`attnkit.attention` (one head,
    ``scale=1``); ``concat`` is computed here. Parameters: ``general``: ``w_a`` ``(query_dim, key_dim)`` (the
    ``W_a`` of ``h_tᵀ W_a h̄_s``, applied to the keys); ``concat``: ``w_a``
    ``(hidden_dim, query_dim + key_dim)`` and ``v_a`` ``(1, hidden_dim)``; none for ``dot``.

    Args:
        query_dim: width of the target hidden state ``h_t``.
        key_dim: width of the source states ``h̄_s`` (default ``query_dim``; ``dot`` needs them equal).
        score: ``"dot"``, ``"general"`` (default) or ``"concat"``.
        hidden_dim: width of the ``concat`` MLP (default ``query_dim``).
        device, dtype: of the parameters.

    Raises:
        ValueError: unknown ``score`` (the valid ones are listed), non-positive sizes, or ``dot`` with
            ``query_dim != key_dim``.

    References:
        Luong et al. 2015, Eqs. 7-8.

    Example:
        >>> import torch
        >>> attn = LuongAttention(16, score="dot")
        >>> context, weights = attn(torch.randn(2, 3, 16), torch.randn(2, 5, 16))
        >>> context.shape, weights.shape
        (torch.Size([2, 3, 16]), torch.Size([2, 3, 5]))
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int | None = None,
        *,
        score: str = "general",
        hidden_dim: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        if score not in SCORES:
            raise ValueError(f"LuongAttention: unknown score {score!r}; valid: {', '.join(map(repr, SCORES))}")
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"LuongAttention: expected {name} to be a positive int, got {val!r}")
        if score == "dot" and query_dim != key_dim:
            raise ValueError(
                f"LuongAttention: score='dot' needs query_dim == key_dim, got {query_dim} and {key_dim}; "
                f"use score='general' for different widths"
            )
        self.query_dim, self.key_dim, self.score = query_dim, key_dim, score
        factory = {"device": device, "dtype": dtype}
        if score == "general":
            self.w_a = nn.Linear(key_dim, query_dim, bias=False, **factory)
        elif score == "concat":
            self.w_a = nn.Linear(query_dim + key_dim, hidden_dim, bias=False, **factory)
            self.v_a = nn.Linear(hidden_dim, 1, bias=False, **factory)

    def extra_repr(self) -> str:
        return f"query_dim={self.query_dim}, key_dim={self.key_dim}, score={self.score!r}"

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor | None = None, *, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Align each target state with the source states and return the context.

        Args:
            query: ``(B, Lq, query_dim)`` target hidden states ``h_t``.
            key: ``(B, Lk, key_dim)`` source hidden states ``h̄_s``.
            value: ``(B, Lk, Dv)``; default ``key``.
            attn_mask: broadcastable to ``(B, Lq, Lk)``; bool **True = may attend**, or float added to the
                scores.

        Returns:
            ``(context, weights)``: ``(B, Lq, Dv)`` and ``(B, Lq, Lk)`` (rows sum to 1; rows with no key left
            are 0 and give a zero context).

        Raises:
            TypeError: non-tensor inputs or a mask of another dtype.
            ValueError: wrong shapes, or a mask that does not broadcast.
        """
        value = check_inputs("LuongAttention", query, key, value, self.query_dim, self.key_dim)
        if self.score == "concat":
            w_q, w_k = self.w_a.weight.split((self.query_dim, self.key_dim), dim=1)
            hidden = (query @ w_q.T).unsqueeze(2) + (key @ w_k.T).unsqueeze(1)  # (B, Lq, Lk, hidden)
            scores = self.v_a(hidden.tanh()).squeeze(-1)  # (B, Lq, Lk)
            return softmax_context("LuongAttention", scores, value, attn_mask)
        keys = self.w_a(key) if self.score == "general" else key  # W_a h̄_s: (B, Lk, query_dim)
        mask = attn_mask.unsqueeze(-3) if isinstance(attn_mask, Tensor) and attn_mask.ndim >= 2 else attn_mask
        q = query.unsqueeze(1)  # (B, 1, Lq, query_dim): one head
        v = value.unsqueeze(1).to(q.dtype)
        out = attention(q, keys.unsqueeze(1), v, attn_mask=mask, scale=1.0, return_weights=True)
        return out.output.squeeze(1).to(value.dtype), out.weights.squeeze(1)
