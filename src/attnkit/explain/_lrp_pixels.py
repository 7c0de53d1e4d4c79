"""Relevance from the tokens of a vision transformer down to its pixels, through a convolutional patch stem.

The stem is everything that runs between the first ``nn.Conv2d`` reading the image and the first transformer
layer: attnkit's :class:`~attnkit.vision.patch_embed.PatchEmbed` (one convolution, kernel = stride),
:class:`~attnkit.vision.conv_patch_embed.ConvPatchEmbed` (convolution, BatchNorm, ReLU stack and a ``1x1``
projection), Hugging Face's ``ViTPatchEmbeddings`` and CLIP's vision embeddings (with CLIP's LayerNorm over the
tokens before the first layer). It may hold convolutions, BatchNorm2d in eval mode, activations, dropout,
position tables and LayerNorm over the tokens; any other module makes ``lrp`` fall back to tokens (or raise,
with ``pixels=True``). The patch tokens must be the last ``Gh·Gw`` tokens of the first layer's input, in the
row-major order of the stem's output grid (attnkit's ViT, Hugging Face's ViT, DeiT, CLIP). Its rules, in the
gradient form of :func:`attnkit.explain.lrp` (relevance = tensor ⊙ modified gradient):

* every convolution after the first, and BatchNorm2d in eval mode (the affine map ``a x + c``): LRP-0, the plain
  gradient; the bias of a convolution and the shift ``c = β - γ μ / √(σ² + ε)`` of a BatchNorm absorb
  ``b ⊙ ∂̃s/∂y``; ReLU (and other activations): the identity rule of :func:`attnkit.explain.lrp`;
* the first convolution (pixels in), :data:`PIXEL_RULES`: ``"zb"`` (default) the z^B rule of Montavon et al.
  2017 / 2019 (Sec. 10.3.2) for inputs bounded by ``l ≤ x ≤ h``, ``R_i = Σ_j (x_i w_ij - l_i w_ij⁺ - h_i w_ij⁻)
  / z^B_j · R_j``; ``"w2"`` the w² rule (Montavon et al. 2017), ``R_i = Σ_j w_ij² / Σ_i' w_i'j² · R_j``;
  ``"lrp-0"`` the plain gradient (``x ⊙ ∂̃s/∂x``). z^B and w² pass on the whole relevance ``R_j = y_j ∂̃s/∂y_j``
  of each output, bias included, so the first convolution's bias absorbs nothing; every term of ``z^B_j`` is
  ``≥ 0`` (``x ≥ l`` meets ``w⁺``, ``x ≤ h`` meets ``w⁻``), so its denominator only vanishes when every pixel of
  a receptive field sits on the bound its weight points away from (then ``R_j`` is recorded as absorbed).
  Padding is no pixel: it enters neither the numerators nor the denominators.

Why z^B is the default: Montavon et al. recommend it for the pixel layer (LRP-0 there is gradient x input,
which can give no relevance to a pixel at the lower bound: on the digit canvases the black background, where
the absence of ink is evidence too), and it needs only the pixel range. ``bounds`` gives that range (the
image's preprocessing range); by default each image's own per-channel minimum and maximum, the tightest box that
holds it (no batch statistics: an image's relevance does not depend on the other images in the batch). Measured
on the shipped digit ViT (``benchmarks/RESULTS.md``, CP-LRP above the pixels): z^B beats LRP-0 on deletion AUC
(0.088 against 0.103), insertion AUC (0.595 against 0.221), AOPC comprehensiveness and sufficiency; LRP-0
points into the digit's box more often (0.99 against 0.70), its mass staying on the ink.

Where the relevance absorbed on the way goes with ``conserve=True`` (the token-level relevance already sums to
the score, :func:`attnkit.explain.lrp`): each absorbed amount is given to the pixels of the place it was
absorbed at, in proportion to their ``|R|`` there (the pixel relevance of the rules above; evenly where that is
0): a stem bias / BatchNorm shift at output ``(i, j)`` of its layer to the pixels of that cell of the image
(nearest-neighbour cells, ``⌊y · h' / Hi⌋``); what a patch token holds beyond its stem output (its position
embedding, and the biases of the transformer that :func:`~attnkit.explain.lrp` gave it) to its patch; what the
class (prefix) tokens hold, which has no place, to the whole image. The pixel relevance then sums to the
score up to rounding, and its map is the rules' map with the shares laid on where they belong.

References:
    Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview", in Explainable AI (LNCS 11700),
    Sec. 10.3.2 (the input layer: z^B for pixels); Montavon et al. 2017, "Explaining nonlinear classification
    decisions with deep Taylor decomposition", Pattern Recognition 65 (the z^B and w² rules).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from attnkit.explain import _lrp_rules as rules

__all__ = ["PIXEL_RULES", "PixelStem", "find_image"]

PIXEL_RULES = ("zb", "w2", "lrp-0")
#: Modules that may run inside a stem (anything else makes the stem unsupported): besides activations, and
#: LayerNorm over the tokens (after the last convolution, e.g. CLIP's pre-norm; the LN-rule of lrp). Position
#: tables (``nn.Embedding`` of position ids) do not depend on the pixels.
_STEM_MODULES = (nn.Conv2d, nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.Embedding)


def find_image(inputs: Any) -> Tensor | None:
    """The one 4-D floating tensor ``(B, C, Hi, Wi)`` among ``inputs`` (a tensor, a tuple/list or a dict)."""
    if isinstance(inputs, dict):
        values = list(inputs.values())
    elif isinstance(inputs, (tuple, list)):
        values = list(inputs)
    else:
        values = [inputs]
    found = [v for v in values if isinstance(v, Tensor) and v.dim() == 4 and v.is_floating_point()]
    return found[0] if len(found) == 1 else None


def _check_bounds(x: Tensor, bounds) -> tuple[Tensor, Tensor]:
    if bounds is None:
        return x.amin((2, 3), keepdim=True).expand_as(x), x.amax((2, 3), keepdim=True).expand_as(x)
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise TypeError(f"lrp: expected bounds to be a (low, high) pair, got {bounds!r:.80}")
    try:
        low, high = (torch.as_tensor(b, dtype=x.dtype, device=x.device).expand_as(x) for b in bounds)
    except RuntimeError:
        raise ValueError(
            f"lrp: bounds must be numbers or tensors broadcastable to the image {tuple(x.shape)}, e.g. (C, 1, 1)"
        ) from None
    if bool((x < low).any()) or bool((x > high).any()):
        raise ValueError(
            f"lrp: the image's pixels lie in [{float(x.min()):.4g}, {float(x.max()):.4g}], outside bounds "
            f"{tuple(bounds)!r:.80}; expected the range of the preprocessed pixels (low <= x <= high)"
        )
    return low, high


class PixelStem:
    """Finds the stem while the model runs, applies the first-layer rule and collects what the stem absorbs.

    Hooks (installed by :meth:`install`) act only between the first ``nn.Conv2d`` call whose input has the
    image's shape and :meth:`close` (called when the first transformer layer starts).
    """

    def __init__(self, image_shape: torch.Size, rule: str, bounds) -> None:
        self.image_shape, self.rule, self.bounds = tuple(image_shape), rule, bounds
        self.pixels: Tensor | None = None  # the first convolution's input, a leaf
        self.first: nn.Module | None = None
        self.leaves: list[Tensor] = []  # what the pixel relevance is read at: [x] (lrp-0), [x, l, h] (zb), [1] (w2)
        self.open = False
        self.closed = False
        self.unsupported: list[str] = []
        self.absorbed: list[tuple[Tensor, Any]] = []  # (output, g -> (B, h', w') absorbed map)
        self.out: Tensor | None = None  # the stem's last 4-D output: the patch grid

    @property
    def ok(self) -> bool:
        return self.pixels is not None and not self.unsupported and self.out is not None

    def close(self) -> bool:
        """End the stem (the first transformer layer starts); whether pixel relevance can be computed."""
        self.open, self.closed = False, True
        return self.ok

    def install(self, model: nn.Module, stack) -> None:
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                stack.callback(m.register_forward_pre_hook(self._pixel_leaf).remove)
        for m in model.modules():
            if not list(m.children()):
                stack.callback(m.register_forward_hook(self._stem_module).remove)

    def _pixel_leaf(self, m, args):
        if self.pixels is not None or self.closed or not args or tuple(args[0].shape) != self.image_shape:
            return None
        x = args[0].detach().requires_grad_(True)
        self.pixels, self.leaves, self.open, self.first = x, [x], True, m
        return (x, *args[1:])

    def _stem_module(self, m, args, out):
        if not self.open or not isinstance(out, Tensor):
            return None
        token_norm = isinstance(m, nn.LayerNorm) and out.dim() == 3  # on the tokens, after the stem (CLIP's pre-norm)
        if not isinstance(m, _STEM_MODULES) and not rules.is_activation(m) and not token_norm:
            self.unsupported.append(type(m).__name__)
            return None
        if isinstance(m, nn.BatchNorm2d) and (m.training or not m.track_running_stats):
            self.unsupported.append("BatchNorm2d in training mode (call model.eval())")
            return None
        if m is self.first and self.rule != "lrp-0":
            out = self._first_rule(m, out)
        elif isinstance(m, nn.Conv2d) and m.bias is not None:
            bias = m.bias.detach().double()
            self.absorbed.append((out, lambda g, b=bias: (g.double() * b[:, None, None]).sum(1)))
        elif isinstance(m, nn.BatchNorm2d):
            scale = (m.running_var + m.eps).rsqrt() * (m.weight if m.weight is not None else 1.0)
            shift = -m.running_mean * scale + (m.bias if m.bias is not None else 0.0)
            shift = shift.detach().double()
            self.absorbed.append((out, lambda g, c=shift: (g.double() * c[:, None, None]).sum(1)))
        if out.dim() == 4:
            self.out = out
        return out

    def _first_rule(self, m: nn.Conv2d, out: Tensor) -> Tensor:
        """z^B or w² for the pixel layer: the output keeps its value, its gradient is that of the rule's
        numerators times ``y / z`` (the whole relevance of each output passed on)."""
        x = self.pixels
        weight = m.weight.detach()
        if self.rule == "zb":
            low, high = (b.detach().clone().requires_grad_(True) for b in _check_bounds(x.detach(), self.bounds))
            self.leaves += [low, high]
            z = (
                m._conv_forward(x, weight, None)
                - m._conv_forward(low, weight.clamp(min=0), None)
                - m._conv_forward(high, weight.clamp(max=0), None)
            )
        else:  # w2: the inputs are ones, the weights squared
            ones = torch.ones_like(x, requires_grad=True)
            self.leaves = [ones]
            z = m._conv_forward(ones, weight.square(), None)
        den = z.detach()
        rewired = rules.rewire(out, z * rules._ratio(out, den))
        lost = den == 0
        self.absorbed.append((rewired, lambda g: (g.double() * out.detach().double() * lost).sum(1)))
        return rewired

    def grad_inputs(self) -> list[Tensor]:
        """The tensors whose gradients :meth:`relevance` needs, in its order."""
        return [*self.leaves, self.out, *(t for t, _ in self.absorbed)]

    def relevance(self, grads: list[Tensor], tokens: Tensor | None) -> Tensor:
        """``(B, Hi, Wi)`` float64 pixel relevance from the gradients of :meth:`grad_inputs`.

        Args:
            grads: the gradients of :meth:`grad_inputs`, in that order.
            tokens: ``(B, L)`` conserved token relevance of the first layer's input, or ``None`` (published
                rules: only the rules' pixel relevance).
        """
        n = len(self.leaves)
        leaf_grads, g_out, g_absorbed = grads[:n], grads[n], grads[n + 1 :]
        flow = sum(leaf.detach().double() * g.double() for leaf, g in zip(self.leaves, leaf_grads))
        flow = flow.sum(1)  # (B, Hi, Wi), summed over channels
        if tokens is None:
            return flow
        weight = flow.abs()
        shares = [fn(g) for (_, fn), g in zip(self.absorbed, g_absorbed)]
        patches = (self.out.detach().double() * g_out.double()).sum(1)  # (B, Gh, Gw) relevance of the stem output
        grid = patches.shape[1:]
        prefix = tokens.shape[1] - grid[0] * grid[1]
        shares.append(tokens[:, prefix:].reshape(patches.shape) - patches)
        pooled = tokens[:, :prefix].sum(1)
        result = flow
        for share in shares:
            spread, lost = _spread(share, weight)
            result, pooled = result + spread, pooled + lost
        return result + _spread(pooled[:, None, None], weight)[0]

    def patch_tokens(self, num_tokens: int) -> bool:
        """Whether the first layer's ``num_tokens`` tokens end with one token per cell of the stem's output."""
        return self.out is not None and num_tokens >= self.out.shape[2] * self.out.shape[3]


def _spread(share: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Lay a ``(B, h', w')`` map onto ``(B, Hi, Wi)`` pixels: cell ``(i, j)`` covers the pixels ``(y, x)`` with
    ``⌊y h' / Hi⌋ = i`` and ``⌊x w' / Wi⌋ = j``, and its amount goes to them in proportion to ``weight`` (evenly
    where the cell's weight is 0). Returns the map and ``(B,)`` the amount of cells that cover no pixel."""
    b, (hi, wi), (h, w) = weight.shape[0], weight.shape[1:], share.shape[1:]
    rows = torch.arange(hi, device=weight.device) * h // hi
    cols = torch.arange(wi, device=weight.device) * w // wi
    cell = (rows[:, None] * w + cols[None, :]).flatten()  # (Hi·Wi,)
    flat = weight.reshape(b, -1)
    total = torch.zeros(b, h * w, dtype=flat.dtype, device=flat.device).index_add_(1, cell, flat)
    count = torch.bincount(cell, minlength=h * w).to(flat.dtype)
    even = (1 / count.clamp_min(1))[cell].expand_as(flat)
    cell_total = total[:, cell]
    frac = torch.where(cell_total > 0, flat / cell_total.clamp_min(torch.finfo(flat.dtype).tiny), even)
    amount = share.reshape(b, -1).double()
    lost = (amount * (count == 0)).sum(1)
    return (frac * amount[:, cell]).reshape(b, hi, wi), lost
