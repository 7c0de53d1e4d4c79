"""Attention flow (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 4).

The layers form a flow network: node ``(l, i)`` is token ``i`` after layer ``l`` (``l = 0`` the input
tokens), and an edge ``(l, i) -> (l - 1, j)`` has capacity ``Â_l[i, j]``, the residual-augmented,
row-normalised attention of layer ``l`` (as in :func:`attnkit.explain.rollout`). The attention flow from output
token ``i`` to input token ``j`` is the value of a maximum flow from ``(L, i)`` to ``(0, j)``.

Max-flow is solved by networkx (float capacities, exact) or scipy (integer capacities: the weights are scaled
by ``1 / resolution`` and rounded). Cost is one max-flow per (query row, input token) pair: use ``rows`` to
ask only for the rows you need (e.g. ``rows=[0]`` for a class token).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnkit.explain.records import maps_of
from attnkit.explain.rollout import _check_options, augment, fuse_heads

__all__ = ["attention_flow", "flow_capacities"]

_SOLVERS = ("networkx", "scipy")


def flow_capacities(maps, *, head_fusion: str = "mean", residual: bool = True) -> Tensor:
    """The per-layer capacities ``Â_l``: ``(layers, B, L, L)``, row ``i`` = edges out of ``(l, i)``."""
    _check_options(head_fusion, 0.0, "attention_flow")
    tensors = maps_of(maps, who="attention_flow")
    length = tensors[0].shape[-1]
    return torch.stack([augment(fuse_heads(a, head_fusion), torch.arange(length), residual) for a in tensors])


def _node(layer: int, token: int, length: int) -> int:
    return layer * length + token


def _flows_networkx(caps, rows):
    try:
        import networkx as nx
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attention_flow(solver='networkx') needs networkx: pip install attnkit[explain]") from e
    layers, length = caps.shape[0], caps.shape[-1]
    graph = nx.DiGraph()
    for layer in range(1, layers + 1):
        a = caps[layer - 1]
        for i in range(length):
            for j in range(length):
                if a[i, j] > 0:
                    graph.add_edge(_node(layer, i, length), _node(layer - 1, j, length), capacity=float(a[i, j]))
    graph.add_nodes_from(range((layers + 1) * length))
    out = torch.zeros(len(rows), length, dtype=torch.float64)
    for r, i in enumerate(rows):
        for j in range(length):
            out[r, j] = nx.maximum_flow_value(graph, _node(layers, i, length), _node(0, j, length))
    return out


def _flows_scipy(caps, rows, resolution):
    try:
        import numpy as np
        from scipy.sparse import csr_matrix
        from scipy.sparse.csgraph import maximum_flow
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("attention_flow(solver='scipy') needs scipy: pip install attnkit[explain]") from e
    layers, length = caps.shape[0], caps.shape[-1]
    n = (layers + 1) * length
    dense = np.zeros((n, n), dtype=np.int64)
    for layer in range(1, layers + 1):
        block = np.rint(caps[layer - 1].numpy() / resolution).astype(np.int64)
        dense[layer * length : (layer + 1) * length, (layer - 1) * length : layer * length] = block
    graph = csr_matrix(dense)
    out = torch.zeros(len(rows), length, dtype=torch.float64)
    for r, i in enumerate(rows):
        for j in range(length):
            value = maximum_flow(graph, _node(layers, i, length), _node(0, j, length)).flow_value
            out[r, j] = value * resolution
    return out


def attention_flow(
    maps,
    *,
    rows: Sequence[int] | None = None,
    head_fusion: str = "mean",
    residual: bool = True,
    solver: str = "networkx",
    resolution: float = 1e-6,
) -> Tensor:
    """Maximum attention flow from each output token to each input token.

    Args:
        maps: per-layer self-attention probabilities from the first layer to the last (as for
            :func:`attnkit.explain.rollout`): ``(B, H, L, L)`` tensors or records, or one ``(layers, B, H, L, L)``.
        rows: output tokens ``i`` to compute (negative count from the end); default all ``L``.
        head_fusion: ``"mean"`` (the paper), ``"max"`` or ``"min"``.
        residual: capacities ``0.5 · A + 0.5 · I`` re-normalised (the paper), else ``A`` re-normalised.
        solver: ``"networkx"`` (float capacities) or ``"scipy"`` (integer capacities in units of
            ``resolution``; faster).
        resolution: capacity unit for ``solver="scipy"``; results are exact to about ``resolution · L``.

    Returns:
        ``(B, len(rows), L)`` float64: entry ``[b, r, j]`` is the max-flow value from output token ``rows[r]``
        to input token ``j``. Each value lies in ``[0, 1]``.

    Raises:
        ValueError: maps of mismatched token counts or cross-attention, an unknown solver, rows out of range,
            a non-positive resolution.
        ImportError: networkx / scipy missing (``pip install attnkit[explain]``).

    References:
        Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", ACL, Sec. 4 (attention flow).
    """
    if solver not in _SOLVERS:
        raise ValueError(f"attention_flow: solver must be one of {', '.join(map(repr, _SOLVERS))}, got {solver!r}")
    if not (isinstance(resolution, (int, float)) and resolution > 0):
        raise ValueError(f"attention_flow: resolution must be a positive number, got {resolution!r}")
    caps = flow_capacities(maps, head_fusion=head_fusion, residual=residual).detach().to("cpu", torch.float64)
    length = caps.shape[-1]
    rows = list(range(length)) if rows is None else [int(r) for r in rows]
    bad = [r for r in rows if not -length <= r < length]
    if bad:
        raise ValueError(f"attention_flow: rows {bad} out of range for maps of {length} tokens")
    rows = [r % length for r in rows]
    per_item = []
    for b in range(caps.shape[1]):
        item = caps[:, b]
        per_item.append(_flows_networkx(item, rows) if solver == "networkx" else _flows_scipy(item, rows, resolution))
    return torch.stack(per_item)
