"""Additive (concat / MLP) attention of Bahdanau, Cho and Bengio 2015.

"Neural Machine Translation by Jointly Learning to Align and Translate", ICLR 2015, Eq. 6 and Appendix A.1.2:
``e_ij = v_aᵀ tanh(W_a s_{i-1} + U_a h_j)``, ``α_ij = softmax_j(e_ij)``, ``c_i = Σ_j α_ij h_j``.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.nn._alignment import check_inputs, softmax_context

__all__ = ["AdditiveAttention"]


class AdditiveAttention(nn.Module):
    """Bahdanau attention: ``score(q_i, k_j) = vᵀ tanh(W q_i + U k_j)``.

    Parameters: ``query_proj`` (``W``, ``(hidden_dim, query_dim)``, no bias), ``key_proj`` (``U``,
    ``(hidden_dim, key_dim)``, bias when ``bias``), ``score_proj`` (``v``, ``(1, hidden_dim)``, no bias).

    Args:
        query_dim: width of the decoder state ``s_{i-1}`` (``n`` in the paper).
        key_dim: width of the encoder annotations ``h_j`` (``2n`` for a bidirectional encoder).
        hidden_dim: width of the alignment MLP (``n'``; default ``query_dim``).
        bias: add a bias inside the tanh (the paper has none). Default ``False``.
        device, dtype: of the parameters.

    Raises:
        ValueError: a size is not a positive int.

    References:
        Bahdanau et al. 2015, Eq. 6 and Appendix A.1.2.

    Example:
        >>> import torch
        >>> attn = AdditiveAttention(16, 32)
        >>> context, weights = attn(torch.randn(2, 3, 16), torch.randn(2, 7, 32))
        >>> context.shape, weights.shape
        (torch.Size([2, 3, 32]), torch.Size([2, 3, 7]))
    """

    def __init__(
        self,
        query_dim: int,
        key_dim: int,
        hidden_dim: int | None = None,
        *,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        for name, val in (("query_dim", query_dim), ("key_dim", key_dim), ("hidden_dim", hidden_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"AdditiveAttention: expected {name} to be a positive int, got {val!r}")
        self.query_dim, self.key_dim, self.hidden_dim = query_dim, key_dim, hidden_dim
        factory = {"device": device, "dtype": dtype}
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False, **factory)
        self.key_proj = nn.Linear(key_dim, hidden_dim, bias=bias, **factory)
        self.score_proj = nn.Linear(hidden_dim, 1, bias=False, **factory)

    def forward(
        self, query: Tensor, key: Tensor, value: Tensor | None = None, *, attn_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Align each query with the keys and return the weighted sum of the values.

        Args:
            query: ``(B, Lq, query_dim)`` decoder states.
            key: ``(B, Lk, key_dim)`` encoder annotations.
            value: ``(B, Lk, Dv)``; default ``key`` (the paper's ``c_i = Σ_j α_ij h_j``).
            attn_mask: broadcastable to ``(B, Lq, Lk)``; bool **True = may attend** (a source padding mask is
                ``lengths_mask[:, None, :]``), or float added to the scores.

        Returns:
            ``(context, weights)``: ``(B, Lq, Dv)`` and ``(B, Lq, Lk)`` alignment weights (rows sum to 1; rows
            with no key left are 0 and give a zero context).

        Raises:
            TypeError: non-tensor inputs or a mask of another dtype.
            ValueError: wrong shapes, or a mask that does not broadcast.
        """
        value = check_inputs("AdditiveAttention", query, key, value, self.query_dim, self.key_dim)
        hidden = self.query_proj(query).unsqueeze(2) + self.key_proj(key).unsqueeze(1)  # (B, Lq, Lk, hidden)
        scores = self.score_proj(hidden.tanh()).squeeze(-1)  # (B, Lq, Lk)
        return softmax_context("AdditiveAttention", scores, value, attn_mask)
