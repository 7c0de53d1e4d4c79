"""The DETR decoder with iterative box refinement: self-attention among the object queries, cross-attention to
the multi-level image features (deformable, Zhu et al. 2021, or dense multi-head attention), a feed-forward block,
and per layer a class head and a box head whose output refines the previous layer's boxes
(Deformable DETR, Sec. 4.1 / App. A.4; RT-DETR, Sec. 4.3).
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from attnkit.nn import MultiHeadAttention
from attnkit.vision.deformable import MultiScaleDeformableAttention
from attnkit.vision.detection.boxes import inverse_sigmoid

__all__ = ["MLP", "DetrDecoder", "DetrDecoderLayer"]


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (DETR's box head)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else layer(x).relu()
        return x


class DetrDecoderLayer(nn.Module):
    """Post-norm decoder layer: ``self_attn`` over queries, ``cross_attn`` to the image, ``ffn``.

    Args:
        embed_dim: ``E``.
        num_heads: heads of both attentions.
        num_levels: feature levels.
        num_points: sampling points per head and level (deformable only).
        ffn_dim: hidden width of the feed-forward block.
        cross_attention: ``"deformable"`` (:class:`attnkit.vision.MultiScaleDeformableAttention` around each
            query's reference box) or ``"dense"`` (:class:`attnkit.nn.MultiHeadAttention` over all positions).
    """

    def __init__(self, embed_dim, num_heads, num_levels, num_points, ffn_dim, cross_attention):
        super().__init__()
        self.cross_attention = cross_attention
        self.self_attn = MultiHeadAttention(embed_dim, num_heads)
        if cross_attention == "deformable":
            self.cross_attn = MultiScaleDeformableAttention(
                embed_dim, num_heads, num_levels=num_levels, num_points=num_points
            )
        else:
            self.cross_attn = MultiHeadAttention(embed_dim, num_heads)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(embed_dim) for _ in range(3))
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, embed_dim))

    def forward(self, target, query_pos, ref_boxes, memory, memory_pos, spatial_shapes) -> Tensor:
        qk = target + query_pos
        target = self.norm1(target + self.self_attn(qk, qk, target)[0])
        if self.cross_attention == "deformable":
            attended = self.cross_attn(target + query_pos, memory, ref_boxes, spatial_shapes)
        else:
            attended = self.cross_attn(target + query_pos, memory + memory_pos, memory)[0]
        target = self.norm2(target + attended)
        return self.norm3(target + self.ffn(target))


class DetrDecoder(nn.Module):
    """A stack of :class:`DetrDecoderLayer` with per-layer class/box heads and box refinement.

    Each layer ``i`` gets reference boxes ``r_i`` (normalised cxcywh, gradient-stopped as in Deformable DETR)
    and a query position embedding ``MLP(r_i)``; its box head predicts ``sigmoid(delta + inverse_sigmoid(r_i))``,
    which becomes ``r_{i+1}``.

    Returns:
        ``(logits (layers, B, Q, classes), boxes (layers, B, Q, 4) cxcywh)``.
    """

    def __init__(
        self, *, embed_dim, num_heads, num_levels, num_points, ffn_dim, num_layers, num_classes, cross_attention
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DetrDecoderLayer(embed_dim, num_heads, num_levels, num_points, ffn_dim, cross_attention)
            for _ in range(num_layers)
        )
        self.query_pos_head = MLP(4, 2 * embed_dim, embed_dim, 2)
        self.class_heads = nn.ModuleList(nn.Linear(embed_dim, num_classes) for _ in range(num_layers))
        self.box_heads = nn.ModuleList(MLP(embed_dim, embed_dim, 4, 3) for _ in range(num_layers))
        for head in self.box_heads:
            nn.init.zeros_(head.layers[-1].weight)
            nn.init.zeros_(head.layers[-1].bias)

    def forward(self, target, ref_boxes, memory, memory_pos, spatial_shapes) -> tuple[Tensor, Tensor]:
        logits, boxes = [], []
        ref = ref_boxes
        for layer, cls_head, box_head in zip(self.layers, self.class_heads, self.box_heads):
            target = layer(target, self.query_pos_head(ref), ref, memory, memory_pos, spatial_shapes)
            new = (box_head(target) + inverse_sigmoid(ref)).sigmoid()
            logits.append(cls_head(target))
            boxes.append(new)
            ref = new.detach()
        return torch.stack(logits), torch.stack(boxes)
