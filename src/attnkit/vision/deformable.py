"""Multi-scale deformable attention (Zhu et al. 2021, "Deformable DETR", Eq. 2).

Each query looks at a handful of points per head and per feature level instead of every key: the points are a
reference point plus offsets predicted from the query, their features are read by bilinear interpolation
(:func:`torch.nn.functional.grid_sample`), and the query mixes them with softmax weights taken over
levels x points. With ``K`` points and ``L`` levels the cost per query is ``O(H * L * K)`` reads, independent of
the image size.

Shape legend: ``B`` batch, ``Lq`` queries, ``S`` flattened keys of all levels (``sum(h_l * w_l)``, level by level,
row-major), ``H`` heads, ``D`` head_dim, ``E`` embed_dim, ``NL`` levels, ``P`` points per level.
Coordinates are normalised to ``[0, 1]`` per level, ``(x, y)`` order, ``(0, 0)`` at the top-left corner of the map
and ``(1, 1)`` at the bottom-right corner (``grid_sample(..., align_corners=False)``); samples outside the map
read zeros.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.functional import observe
from attnkit.vision._common import check_int, check_tokens

__all__ = ["DeformableAttentionOutput", "MultiScaleDeformableAttention", "multi_scale_deformable_attention"]


class DeformableAttentionOutput(NamedTuple):
    """What :class:`MultiScaleDeformableAttention` returns with ``return_weights=True``.

    Attributes:
        output: ``(B, Lq, E)`` attended features (after ``output_proj``).
        sampling_locations: ``(B, Lq, H, NL, P, 2)`` normalised ``(x, y)`` of every sampling point.
        attention_weights: ``(B, Lq, H, NL, P)`` softmax weights of the points (each ``(B, Lq, H)`` slice sums
            to 1 over levels and points).
    """

    output: Tensor
    sampling_locations: Tensor
    attention_weights: Tensor


def _check_shapes(spatial_shapes: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    shapes = [tuple(int(v) for v in s) for s in spatial_shapes]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise ValueError(
            f"multi_scale_deformable_attention: expected spatial_shapes as a non-empty list of (h, w) pairs >= 1, "
            f"got {spatial_shapes!r}"
        )
    return shapes  # type: ignore[return-value]


def multi_scale_deformable_attention(
    value: Tensor,
    spatial_shapes: Sequence[Sequence[int]],
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Bilinear sampling of every level at the given points, mixed by the given weights (the core of Eq. 2).

    ``out[b, q, h] = sum_l sum_k attention_weights[b, q, h, l, k] * bilinear(value_l[b, :, h], loc[b, q, h, l, k])``

    Args:
        value: ``(B, S, H, D)`` per-head values of all levels, flattened level by level (row-major).
        spatial_shapes: ``NL`` pairs ``(h_l, w_l)`` with ``sum(h_l * w_l) == S`` (list or ``(NL, 2)`` int tensor).
        sampling_locations: ``(B, Lq, H, NL, P, 2)`` normalised ``(x, y)`` in ``[0, 1]`` (outside reads zeros).
        attention_weights: ``(B, Lq, H, NL, P)`` weights (softmax over ``NL * P`` in the paper; not checked).

    Returns:
        ``(B, Lq, H * D)``, dtype of ``value``.

    Raises:
        ValueError: shapes that do not agree (the message names the argument).

    References:
        Zhu et al. 2021, "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR, Eq. 2;
        matches ``MultiScaleDeformableAttention`` of Hugging Face transformers (its pure-PyTorch path).
    """
    shapes = _check_shapes(spatial_shapes)
    if value.ndim != 4:
        raise ValueError(f"multi_scale_deformable_attention: expected value (B, S, H, D), got {tuple(value.shape)}")
    b, s, h, d = value.shape
    if sum(hh * ww for hh, ww in shapes) != s:
        raise ValueError(
            f"multi_scale_deformable_attention: spatial_shapes {shapes} cover {sum(a * c for a, c in shapes)} "
            f"positions but value has S={s}"
        )
    if (
        sampling_locations.ndim != 6
        or sampling_locations.shape[2:4] != (h, len(shapes))
        or (sampling_locations.shape[0] != b or sampling_locations.shape[-1] != 2)
    ):
        raise ValueError(
            f"multi_scale_deformable_attention: expected sampling_locations (B={b}, Lq, H={h}, NL={len(shapes)}, "
            f"P, 2), got {tuple(sampling_locations.shape)}"
        )
    if attention_weights.shape != sampling_locations.shape[:-1]:
        raise ValueError(
            f"multi_scale_deformable_attention: expected attention_weights {tuple(sampling_locations.shape[:-1])} "
            f"(the sampling_locations shape without its last dim), got {tuple(attention_weights.shape)}"
        )
    lq, p = sampling_locations.shape[1], sampling_locations.shape[4]
    grids = (2 * sampling_locations - 1).permute(0, 2, 1, 3, 4, 5).flatten(0, 1)  # (B*H, Lq, NL, P, 2)
    per_level = value.split([hh * ww for hh, ww in shapes], dim=1)
    sampled = []
    for lvl, (hh, ww) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * h, d, hh, ww)  # (B*H, D, h_l, w_l)
        g = grids[:, :, lvl]  # (B*H, Lq, P, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(sampled, dim=-2)  # (B*H, D, Lq, NL, P)
    w = attention_weights.permute(0, 2, 1, 3, 4).reshape(b * h, 1, lq, len(shapes), p)
    out = (stacked * w).sum((-2, -1))  # (B*H, D, Lq)
    return out.view(b, h * d, lq).transpose(1, 2)  # (B, Lq, H*D)


class MultiScaleDeformableAttention(nn.Module):
    """Multi-scale deformable attention module (Zhu et al. 2021, Eq. 2 and Sec. 4.1).

    Per query and head, ``sampling_offsets`` (a linear map of the query) gives ``NL * P`` offsets and
    ``attention_weights`` (another linear map, softmax over the ``NL * P`` points) their weights. The points are
    ``reference + offset / (w_l, h_l)`` for 2-d reference points (offsets in cells of each level), or
    ``(cx, cy) + offset / P * (w, h) / 2`` for reference boxes (Deformable DETR's box refinement, also RT-DETR).
    Values are ``value_proj`` of the flattened multi-level features; the mixed samples go through ``output_proj``.

    While :func:`attnkit.explain.capture` (any observer) is active, each call reports an
    :class:`~attnkit.functional.observe.AttentionEvent` of kind ``"deformable"`` whose ``weights`` are
    ``(B, H, Lq, NL, P)`` and whose layout carries ``sampling_locations`` ``(B, H, Lq, NL, P, 2)`` and
    ``spatial_shapes``.

    Args:
        embed_dim: ``E``, width of queries and values.
        num_heads: ``H``; ``E % H == 0``.
        num_levels: ``NL`` feature levels.
        num_points: ``P`` sampling points per head and level.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Raises:
        TypeError / ValueError: bad sizes; at call time, inputs of the wrong shape (the message names them).

    References:
        Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR 2021, Eq. 2
        (initialisation from the authors' code: offsets start on a ring of directions, weights uniform).

    Example:
        >>> import torch
        >>> attn = MultiScaleDeformableAttention(32, 4, num_levels=2, num_points=3)
        >>> shapes = [(8, 8), (4, 4)]
        >>> value = torch.randn(2, 80, 32)
        >>> out = attn(torch.randn(2, 5, 32), value, torch.rand(2, 5, 2), shapes, return_weights=True)
        >>> out.output.shape, out.sampling_locations.shape
        (torch.Size([2, 5, 32]), torch.Size([2, 5, 4, 2, 3, 2]))
    """

    def __init__(
        self, embed_dim: int, num_heads: int = 8, *, num_levels: int = 4, num_points: int = 4, device=None, dtype=None
    ) -> None:
        super().__init__()
        owner = "MultiScaleDeformableAttention"
        for name, v in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            check_int(v, name, owner)
        check_int(num_levels, "num_levels", owner)
        check_int(num_points, "num_points", owner)
        if embed_dim % num_heads:
            raise ValueError(f"{owner}: expected embed_dim ({embed_dim}) to be a multiple of num_heads ({num_heads})")
        dd = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.num_levels, self.num_points = embed_dim, num_heads, num_levels, num_points
        self.head_dim = embed_dim // num_heads
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2, **dd)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points, **dd)
        self.value_proj = nn.Linear(embed_dim, embed_dim, **dd)
        self.output_proj = nn.Linear(embed_dim, embed_dim, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Deformable DETR's initialisation: head ``h`` starts looking along direction ``2 pi h / H``, point ``k``
        at distance ``k + 1``; uniform weights; Xavier-uniform projections with zero bias."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values  # (H, 2) on the unit square
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def sampling(self, query: Tensor, reference_points: Tensor, spatial_shapes) -> tuple[Tensor, Tensor]:
        """Sampling locations ``(B, Lq, H, NL, P, 2)`` and softmax weights ``(B, Lq, H, NL, P)`` of ``query``."""
        b, lq, _ = query.shape
        h, nl, p = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(b, lq, h, nl, p, 2)
        weights = self.attention_weights(query).view(b, lq, h, nl * p).softmax(-1).view(b, lq, h, nl, p)
        ref = reference_points
        if ref.ndim == 3:  # one reference per query, shared by all levels
            ref = ref.unsqueeze(2).expand(b, lq, nl, ref.shape[-1])
        if ref.shape[-1] == 2:
            wh = torch.tensor([[w, hh] for hh, w in spatial_shapes], dtype=query.dtype, device=query.device)
            loc = ref[:, :, None, :, None, :] + offsets / wh[None, None, None, :, None, :]
        else:
            loc = ref[:, :, None, :, None, :2] + offsets / p * ref[:, :, None, :, None, 2:] * 0.5
        return loc, weights

    def forward(
        self,
        query: Tensor,
        value: Tensor,
        reference_points: Tensor,
        spatial_shapes: Sequence[Sequence[int]],
        *,
        key_padding_mask: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | DeformableAttentionOutput:
        """Attend from ``query`` to the multi-level ``value`` features at learned points around the references.

        Args:
            query: ``(B, Lq, E)`` queries (position embedding already added, as in Deformable DETR).
            value: ``(B, S, E)`` flattened features of all levels (level by level, row-major).
            reference_points: ``(B, Lq, NL, 2)`` normalised ``(x, y)``, or ``(B, Lq, NL, 4)`` boxes
                ``(cx, cy, w, h)``; ``(B, Lq, 2)`` / ``(B, Lq, 4)`` are shared by all levels.
            spatial_shapes: ``NL`` pairs ``(h_l, w_l)``.
            key_padding_mask: ``(B, S)`` bool, **True = padding** (its value is zeroed, as in the reference
                implementation, where a point falling on padding reads 0); ``None``: all valid.
            return_weights: also return the sampling locations and weights.

        Returns:
            ``(B, Lq, E)``, or a :class:`DeformableAttentionOutput` when ``return_weights``.

        Raises:
            TypeError / ValueError: an argument of the wrong type or shape (named in the message).
        """
        owner = "MultiScaleDeformableAttention"
        check_tokens(query, self.embed_dim, owner, "query")
        check_tokens(value, self.embed_dim, owner, "value")
        shapes = _check_shapes(spatial_shapes)
        if len(shapes) != self.num_levels:
            raise ValueError(f"{owner}: expected {self.num_levels} spatial_shapes (num_levels), got {len(shapes)}")
        b, lq, _ = query.shape
        ref = reference_points
        ok = isinstance(ref, Tensor) and ref.shape[:2] == (b, lq) and ref.shape[-1] in (2, 4)
        if not ok or ref.ndim not in (3, 4) or (ref.ndim == 4 and ref.shape[2] != self.num_levels):
            got = tuple(ref.shape) if isinstance(ref, Tensor) else type(ref).__name__
            raise ValueError(
                f"{owner}: expected reference_points (B={b}, Lq={lq}, [NL={self.num_levels},] 2 or 4), got {got}"
            )
        v = self.value_proj(value)
        if key_padding_mask is not None:
            if key_padding_mask.shape != value.shape[:2] or key_padding_mask.dtype != torch.bool:
                raise ValueError(
                    f"{owner}: expected a bool key_padding_mask {tuple(value.shape[:2])}, got "
                    f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                )
            v = v.masked_fill(key_padding_mask[..., None], 0.0)
        v = v.view(b, value.shape[1], self.num_heads, self.head_dim)  # (B, S, H, D)
        loc, weights = self.sampling(query, ref, shapes)
        out = self.output_proj(multi_scale_deformable_attention(v, shapes, loc, weights))
        if observe.is_observed():
            layout = {
                "module": type(self).__name__,
                "sampling_locations": loc.detach().transpose(1, 2),  # (B, H, Lq, NL, P, 2)
                "spatial_shapes": shapes,
            }
            observe.emit(
                observe.AttentionEvent(
                    "deformable", output=out, weights=weights.detach().transpose(1, 2), layout=layout
                )
            )
        if return_weights:
            return DeformableAttentionOutput(out, loc, weights)
        return out
