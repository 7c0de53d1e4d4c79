"""attention_flow() against a brute-force minimum cut (= maximum flow) on tiny layered graphs."""

import itertools

import pytest
import torch

from attnkit.explain import rollout
from attnkit.explain.flow import attention_flow, flow_capacities


def _brute_force_max_flow(caps, src, dst):
    """Max-flow = min cut: try every node set S with src in S and dst not, sum capacities leaving S."""
    layers, length = caps.shape[0], caps.shape[-1]
    nodes = range((layers + 1) * length)
    edges = [
        (layer * length + i, (layer - 1) * length + j, float(caps[layer - 1, i, j]))
        for layer in range(1, layers + 1)
        for i in range(length)
        for j in range(length)
    ]
    others = [n for n in nodes if n not in (src, dst)]
    best = float("inf")
    for bits in itertools.product((0, 1), repeat=len(others)):
        side = {src} | {n for n, b in zip(others, bits) if b}
        best = min(best, sum(c for u, v, c in edges if u in side and v not in side))
    return best


def _maps(layers, heads, length, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(layers, 2, heads, length, length, generator=g, dtype=torch.float64)
    return torch.softmax(logits, -1)


@pytest.mark.parametrize(("layers", "length", "fusion"), [(1, 3, "mean"), (2, 3, "max"), (3, 2, "mean")])
def test_flow_equals_brute_force(layers, length, fusion):
    maps = _maps(layers, 2, length, seed=layers + length)
    caps = flow_capacities(maps, head_fusion=fusion)
    want = torch.tensor(
        [
            [[_brute_force_max_flow(caps[:, b], layers * length + i, j) for j in range(length)] for i in range(length)]
            for b in range(2)
        ],
        dtype=torch.float64,
    )
    got = attention_flow(maps, head_fusion=fusion)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=0)
    got_scipy = attention_flow(maps, head_fusion=fusion, solver="scipy", resolution=1e-7)
    torch.testing.assert_close(got_scipy, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention_flow(maps, rows=[-1], head_fusion=fusion), want[:, -1:], atol=1e-9, rtol=0)


def test_single_layer_flow_is_the_capacity_and_rollout_bounds():
    maps = _maps(1, 3, 4, seed=7)
    # One layer: the only path i -> j is the edge itself.
    torch.testing.assert_close(attention_flow(maps), flow_capacities(maps)[0], atol=1e-12, rtol=0)
    # Flows never exceed 1 (all capacity leaving a node sums to 1); rollout rows are distributions.
    deep = _maps(2, 2, 3, seed=8)
    assert float(attention_flow(deep).max()) <= 1 + 1e-9
    torch.testing.assert_close(rollout(deep).sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_flow_errors():
    maps = _maps(1, 1, 3, seed=0)
    with pytest.raises(ValueError, match="solver"):
        attention_flow(maps, solver="lp")
    with pytest.raises(ValueError, match="out of range"):
        attention_flow(maps, rows=[3])
    with pytest.raises(ValueError, match="mismatched token counts"):
        attention_flow([maps[0], _maps(1, 1, 4, seed=0)[0]])
