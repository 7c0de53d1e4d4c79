"""Layer-wise relevance propagation for attnkit transformers: AttnLRP and CP-LRP, in one backward pass.

Relevance is computed as ``input ⊙ gradient`` of the explained logit, with the gradient modified so that each
operation follows its LRP rule (the gradient form of LRP: the relevance of any tensor ``t`` is ``t ⊙ ∂̃s/∂t``):

* linear layers and additions (residuals): the ε-rule with ε → 0 (LRP-0), i.e. the plain gradient; biases
  absorb their share;
* LayerNorm: the LN-rule (Ali et al. 2022): the standard deviation is treated as a constant (detached), so
  the centring and scaling pass relevance linearly;
* element-wise activations of the feed-forward block (GELU, ReLU, ...): the identity rule
  (Achtibat et al. 2024, Sec. 3.3.3), ``∂̃f(h)/∂h = f(h) / h``;
* attention, ``"attnlrp"`` (Achtibat et al. 2024, ICML, Sec. 3.3): the softmax rule (Prop. 3.1,
  ``R_i = x_i (R_i^out - s_i Σ_j R_j^out)``, which is the softmax's own gradient in this form) and the uniform
  rule for the two bilinear products ``q kᵀ`` and ``A v`` (Prop. 3.2: each factor gets half), i.e. the
  gradients of the projected queries and keys are scaled by 1/4 and of the values by 1/2;
* attention, ``"cp-lrp"`` (Ali et al. 2022, "XAI for Transformers: Better Explanations through Conservative
  Propagation"): the attention weights are constants; relevance flows through the values only.

The factors (1/4, 1/4, 1/2; 0 for the query and key under CP-LRP) and the detached LayerNorm deviation are what
the authors' reference implementation does in its gradient x input mode (``lxt`` 2.1, ``lxt/efficient/
patches.py``); ``lxt`` itself cannot be installed here (it requires ``open_clip_torch``, hence torchvision), so
the tests check the rules against the papers' equations written out as explicit relevance propagation.

The attention itself is not recomputed: the model's own kernel runs forward and backward (its backward is the
exact gradient), and the rules are applied by tensor hooks on the outputs of ``q_proj``/``k_proj``/``v_proj``
of :class:`attnkit.nn.MultiHeadAttention`, by forward hooks on ``nn.LayerNorm`` and on the ``linear1``/``linear2``
pair of each :class:`attnkit.nn.TransformerEncoderLayer`. All hooks are removed on exit.

Relevance is read at the input of the first encoder layer (token embeddings plus positions): ``(B, L)`` per
token. Supported: models whose encoder is a stack of :class:`attnkit.nn.TransformerEncoderLayer` (BERT,
:class:`attnkit.vision.VisionTransformer`, the digit ViT, hand-built stacks). Not covered here: Hugging Face
models, the patch embedding's convolutions (pixel relevance), decoders with cross-attention.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attnkit.explain.relevance import target_scores
from attnkit.nn.encoder_layer import TransformerEncoderLayer
from attnkit.nn.multihead import MultiHeadAttention

__all__ = ["LRPResult", "lrp"]

#: Gradient factors of the (query, key, value) projections per rule.
_ATTENTION_FACTORS = {"attnlrp": (0.25, 0.25, 0.5), "cp-lrp": (0.0, 0.0, 1.0)}


class LRPResult(NamedTuple):
    """What :func:`lrp` returns.

    Attributes:
        relevance: ``(B, L)`` relevance of each input token of the first encoder layer (float64 sums).
        conservation: ``(B,)`` ``|Σ_l relevance - logit| / |logit|``: the share of the explained logit that
            the rules did not pass to the inputs (absorbed by biases and the softmax's implicit bias).
        logit: ``(B,)`` the explained score.
        output: the model's output.
    """

    relevance: Tensor
    conservation: Tensor
    logit: Tensor
    output: Any


def _scale_grad(factor: float):
    def hook(_module, _args, out):
        if not out.requires_grad:
            return None
        if factor == 0.0:
            return out.detach()
        out.register_hook(lambda g: g * factor)
        return None

    return hook


def _layer_norm_rule(module: nn.LayerNorm, args, out: Tensor) -> Tensor:
    """LN-rule: the same output, with the standard deviation detached."""
    (x,) = args
    dims = tuple(range(-len(module.normalized_shape), 0))
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + module.eps).sqrt().detach()
    y = centred / std
    if module.weight is not None:
        y = y * module.weight
    if module.bias is not None:
        y = y + module.bias
    return y


def _identity_rule(layer: TransformerEncoderLayer, stack: ExitStack) -> None:
    """``linear2``'s input ``f(h)`` becomes ``h · (f(h) / h)`` with the ratio detached (same value; the gradient
    of ``h`` is ``f(h) / h`` times the incoming one)."""
    seen: dict[str, Tensor] = {}

    def keep(_m, _a, out):
        seen["h"] = out

    def rewrite(_m, args):
        (a,) = args
        h = seen.pop("h", None)
        if h is None or h.shape != a.shape:
            raise RuntimeError("lrp: expected linear2 to read activation(linear1(x)) (the attnkit FFN)")
        ratio = torch.where(h != 0, a / torch.where(h != 0, h, torch.ones_like(h)), torch.zeros_like(h))
        return (h * ratio.detach(),)

    stack.callback(layer.linear1.register_forward_hook(keep).remove)
    stack.callback(layer.linear2.register_forward_pre_hook(rewrite).remove)


def lrp(
    model: nn.Module,
    inputs: Any,
    target: int | Tensor | Callable[[Any], Tensor],
    *,
    rule: str = "attnlrp",
) -> LRPResult:
    """Explain ``model(inputs)`` with AttnLRP or CP-LRP (rules in the module docstring), one forward and backward.

    Args:
        model: a model built from :class:`attnkit.nn.TransformerEncoderLayer` (call ``model.eval()`` first).
        inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``) or one tensor.
        target: the class to explain (an int or ``(B,)`` indices into the logits), or a callable
            ``output -> (B,)`` scores (as :func:`attnkit.explain.relevance`).
        rule: ``"attnlrp"`` (Achtibat et al. 2024) or ``"cp-lrp"`` (attention as constant, Ali et al. 2022).

    Returns:
        :class:`LRPResult`: ``relevance`` ``(B, L)`` (for a ViT: class and patch tokens; reshape the patches to
        the grid), ``conservation`` ``(B,)``.

    Raises:
        ValueError: an unknown rule; no :class:`attnkit.nn.TransformerEncoderLayer` ran in the model.
        TypeError: logits not found or a target callable that returns no tensor.

    References:
        Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
        ICML, Sec. 3 (Prop. 3.1 softmax rule, Prop. 3.2 uniform rule for bilinear products, identity rule);
        Ali et al. 2022, ICML (LN-rule, CP-LRP); Montavon et al. 2019, "Layer-Wise Relevance Propagation: An
        Overview" (ε-rule, gradient x input form).
    """
    if rule not in _ATTENTION_FACTORS:
        raise ValueError(f"lrp: rule must be one of {', '.join(map(repr, _ATTENTION_FACTORS))}, got {rule!r}")
    layers = [m for m in model.modules() if isinstance(m, TransformerEncoderLayer)]
    if not layers:
        raise ValueError(f"lrp: {type(model).__name__} has no attnkit.nn.TransformerEncoderLayer")
    factors = _ATTENTION_FACTORS[rule]
    start: dict[str, Tensor] = {}

    def leaf(_m, args, kwargs):
        if "x" in start:
            return None
        x = (args[0] if args else kwargs["x"]).detach().requires_grad_(True)
        start["x"] = x
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "x": x})

    with ExitStack() as stack, torch.enable_grad():
        stack.callback(layers[0].register_forward_pre_hook(leaf, with_kwargs=True).remove)
        for m in model.modules():
            if isinstance(m, MultiHeadAttention):
                for proj, factor in zip((m.q_proj, m.k_proj, m.v_proj), factors):
                    stack.callback(proj.register_forward_hook(_scale_grad(factor)).remove)
            elif isinstance(m, nn.LayerNorm):
                stack.callback(m.register_forward_hook(_layer_norm_rule).remove)
        for layer in layers:
            _identity_rule(layer, stack)
        if isinstance(inputs, dict):
            output = model(**inputs)
        elif isinstance(inputs, (tuple, list)):
            output = model(*inputs)
        else:
            output = model(inputs)
        x = start.get("x")
        if x is None:
            raise ValueError("lrp: no TransformerEncoderLayer ran inside the model's forward")
        logits = _per_item_scores(output, target, x.shape[0])
        (grad,) = torch.autograd.grad(logits.sum(), [x])
    relevance = (x.detach().double() * grad.double()).sum(-1)
    logit = logits.detach().double()
    conservation = (relevance.sum(-1) - logit).abs() / logit.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return LRPResult(relevance, conservation, logit, output)


def _per_item_scores(output: Any, target, batch: int) -> Tensor:
    """``(B,)`` scores by :func:`attnkit.explain.relevance`'s target rules (summed within an item)."""
    scores = target_scores(output, target)
    if scores.numel() % batch:
        raise ValueError(f"lrp: the target scores {tuple(scores.shape)} do not split into B={batch} items")
    return scores.reshape(batch, -1).sum(-1)
