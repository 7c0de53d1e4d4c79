"""Layer-wise relevance propagation for transformers: AttnLRP and CP-LRP, in one backward pass.

Relevance is computed as ``input ⊙ gradient`` of the explained score, with the gradient modified so that each
operation follows its LRP rule (the gradient form of LRP: the relevance of a tensor ``t`` is ``t ⊙ ∂̃s/∂t``;
the rules live in :mod:`attnkit.explain._lrp_rules` and never change a forward value):

* linear layers and additions (residuals): LRP-0, i.e. the plain gradient;
* LayerNorm / RMSNorm: the deviation is a constant (Ali et al. 2022 LN-rule), so normalisation is linear;
* element-wise activations (GELU, ReLU, SiLU, tanh, ...): the identity rule (Achtibat et al. 2024, Eq. 9),
  ``∂̃f(h)/∂h = f(h) / h``; the product of a gated feed-forward block (``down_proj(act(gate_proj(x)) *
  up_proj(x))``, Llama/Mistral/Qwen2/Gemma in Hugging Face): the uniform rule, half to each factor (CP-LRP:
  the gate is a constant, as ``lxt`` does);
* attention, ``"attnlrp"`` (Achtibat et al. 2024, ICML, Sec. 3.3): the softmax's own gradient, which in this
  form is the softmax rule of Prop. 3.1 (``R_i = x_i (R_i^out - s_i Σ_j R_j^out)``), and the uniform rule for the
  two bilinear products ``q kᵀ`` and ``A v`` (Prop. 3.2: each factor gets half): the gradients of the queries and
  keys are scaled by 1/4 and of the values by 1/2 (``lxt`` 2.1, ``lxt/efficient/patches.py``);
* attention, ``"cp-lrp"`` (Ali et al. 2022): the attention weights are constants; relevance flows through the
  values only.

Where relevance leaks, and ``conserve``. With the papers' rules as published (``conserve=False``, what ``lxt``
computes) relevance is absorbed by every bias (linear layers, LayerNorm shifts, the classifier) and, under
AttnLRP, by the softmax rule itself, a first-order Taylor expansion *with a bias term* (Prop. 3.1): per query
row it passes ``Cov_A(S, g)`` of the ``E_A[g]`` it receives. On the shipped digit ViT the input relevance then
misses the logit by a median 24% (AttnLRP; about 3% of it biases, the rest the softmax) and 3% (CP-LRP).
``conserve=True`` (default) gives every absorbed share to a token, so that the input relevance sums to the
score up to rounding: the relevance a bias absorbs (``b ⊙ ∂̃s/∂y`` at its layer's output ``y``) goes to the
token whose representation it enters, and the softmax rule's bias term of a query row goes to that query's
token (:func:`~attnkit.explain._lrp_rules.softmax_bias`); biases applied after pooling (a classifier on the
class token or the mean) have no token and are split over the tokens in proportion to ``|R|``. No rule is
changed and nothing is divided, so nothing becomes unstable; on the digit ViT the deletion AUC is unchanged
within noise (``benchmarks/RESULTS.md``). (Two alternatives measured there and rejected: leaving biases out of
each linear rule's denominator, zennit's ``zero_params='bias'``, divides by pre-activations near 0 and made the
digit maps less faithful, deletion AUC 0.14 against 0.10; rescaling each softmax row to conserve divides by a
covariance that vanishes for one-hot rows.) The relevance reported is that of
the whole input of the first transformer layer, i.e. token plus position (and segment) embedding, so additive
position tables absorb nothing.

Where the rules are applied: attention calls are intercepted at attnkit's dispatch and recomputed with the
float64-capable reference kernel (``"math"``): every :class:`attnkit.nn.MultiHeadAttention` and every Hugging
Face model loaded with ``attn_implementation="attnkit"``; forward hooks on ``nn.LayerNorm``, ``nn.RMSNorm`` and
Hugging Face ``*RMSNorm`` modules, activation modules (``torch.nn`` and ``transformers.activations``), the
``linear1``/``linear2`` pair of attnkit's layers, the ``down_proj`` of gated feed-forward blocks and
(``conserve``) the outputs of biased ``nn.Linear`` and LayerNorm modules. All are removed on exit. Relevance is
read at the input of the first transformer layer: ``(B, L)``; in an encoder-decoder model that is the encoder's
(source) input (cross-attention gets the same rules; the relevance that reaches the decoder's own inputs is not
reported, so such models need ``conserve=False`` and their conservation error counts it as missing).

Pixels: when the input is an image ``(B, C, Hi, Wi)`` read by a convolutional patch stem (attnkit's
``PatchEmbed`` and ``ConvPatchEmbed``, Hugging Face's ViT and CLIP vision embeddings: convolutions, BatchNorm2d
in eval mode, ReLU), relevance continues through the stem to the pixels, ``(B, Hi, Wi)`` summed over channels: LRP-0
through the later convolutions and the BatchNorms, the z^B rule for bounded pixels at the first convolution
(Montavon et al. 2019, Sec. 10.3.2; ``pixel_rule`` and ``bounds``), and with ``conserve`` the relevance absorbed
by the stem's biases and BatchNorm shifts, the position embeddings and the class token laid on the pixels of the
place it was absorbed at (:mod:`attnkit.explain._lrp_pixels` gives the rules and the reasons). The token-level
relevance stays available as ``token_relevance``. On the shipped digit ViT the pixel relevance sums to the logit
within a median 1.5e-7 (CP-LRP) and 1.8e-7 (AttnLRP) in float32, against 46% and 47% missing with the published
rules (``conserve=False``; ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from attnkit.backends.math import math_forward
from attnkit.explain import _lrp_rules as rules
from attnkit.explain._inputs import call_model
from attnkit.explain._lrp_pixels import PIXEL_RULES, PixelStem, find_image
from attnkit.explain.relevance import target_scores
from attnkit.functional import observe
from attnkit.nn.decoder_layer import TransformerDecoderLayer
from attnkit.nn.encoder_layer import TransformerEncoderLayer

__all__ = ["LRPResult", "lrp"]

#: Gradient factors of the (query, key, value) of each attention call per rule.
_ATTENTION_FACTORS = {"attnlrp": (0.25, 0.25, 0.5), "cp-lrp": (0.0, 0.0, 1.0)}
#: Names of the module lists that hold a model's transformer layers (HF: BERT ``layer``, Llama ``layers``,
#: GPT-2 ``h``; timm/attnkit ``blocks``).
_LAYER_LISTS = ("layer", "layers", "h", "blocks", "block")


class LRPResult(NamedTuple):
    """What :func:`lrp` returns.

    Attributes:
        relevance: float64 input relevance: ``(B, Hi, Wi)`` per pixel (summed over channels) when :func:`lrp`
            explains pixels, else ``(B, L)`` per input token of the first transformer layer (token plus position
            embedding; for a ViT: class and patch tokens).
        conservation: ``(B,)`` ``|Σ relevance - score| / |score|`` (of the relevance returned).
        logit: ``(B,)`` the explained score.
        output: the model's output.
        token_relevance: ``(B, L)`` float64 token relevance (the same tensor as ``relevance`` when no pixels
            are explained).
    """

    relevance: Tensor
    conservation: Tensor
    logit: Tensor
    output: Any
    token_relevance: Tensor | None = None


def _first_layer(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, TransformerEncoderLayer):
            return m
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and name.rsplit(".", 1)[-1] in _LAYER_LISTS:
            return m[0]
    raise ValueError(
        f"lrp: {type(model).__name__} has no attnkit.nn.TransformerEncoderLayer and no module list of layers "
        f"named one of {_LAYER_LISTS}"
    )


def _encoder_decoder(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return True
    return any(isinstance(m, TransformerDecoderLayer) for m in model.modules())


def _install(model: nn.Module, stack: ExitStack, rule: str) -> None:
    """Forward hooks for the normalisation, activation and gating rules."""

    def norm_hook(m, args, out):
        return rules.layer_norm_rule(args[0], out, len(m.normalized_shape), m.eps, m.weight)

    def rms_hook(m, args, out):
        eps = getattr(m, "eps", None) or getattr(m, "variance_epsilon", None) or torch.finfo(args[0].dtype).eps
        return rules.rms_norm_rule(args[0], out, eps, getattr(m, "weight", None))

    def act_hook(_m, args, out):
        return rules.identity_rule(args[0], out)

    def product_hook(_m, args):  # down_proj(act(gate) * up): the uniform rule, half to each factor
        return (rules.scale_grad(args[0], 0.5), *args[1:])

    def constant_gate(_m, _args, out):  # CP-LRP: the gate is a constant, as the attention weights
        return out.detach()

    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            stack.callback(m.register_forward_hook(norm_hook).remove)
        elif isinstance(m, nn.RMSNorm) or type(m).__name__.endswith("RMSNorm"):
            stack.callback(m.register_forward_hook(rms_hook).remove)
        elif rules.is_activation(m):
            stack.callback(m.register_forward_hook(act_hook).remove)
        if all(isinstance(getattr(m, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
            if rule == "cp-lrp":
                stack.callback(m.gate_proj.register_forward_hook(constant_gate).remove)
            else:
                stack.callback(m.down_proj.register_forward_pre_hook(product_hook).remove)
        if isinstance(m, (TransformerEncoderLayer, TransformerDecoderLayer)):
            _ffn_activation(m, stack)


class _BiasRelevance:
    """Collects the relevance ``b ⊙ ∂̃s/∂y`` absorbed by the bias ``b`` of every ``nn.Linear`` and LayerNorm
    output ``y`` downstream of the first layer: ``(B, L)`` for outputs with the token axis of the first layer's
    input (the bias enters that token), ``(B,)`` for the others (after pooling)."""

    def __init__(self, start: dict[str, Tensor]):
        self.start = start
        self.token: Tensor | None = None
        self.pooled: Tensor | None = None

    def install(self, model: nn.Module, stack: ExitStack) -> None:
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.LayerNorm)) and getattr(m, "bias", None) is not None:
                stack.callback(m.register_forward_hook(self._hook).remove)

    def _hook(self, m, _args, out):
        x = self.start.get("x")
        if x is None or not isinstance(out, Tensor) or not out.requires_grad or out.shape[0] != x.shape[0]:
            return
        bias = m.bias.detach()
        tokens = out.dim() >= 3 and out.shape[1] == x.shape[1]

        def hook(g: Tensor) -> None:
            r = (g.double() * bias.double()).sum(-1)
            if tokens:
                self._add_tokens(r.reshape(r.shape[0], r.shape[1], -1).sum(-1))
            else:
                self._add_pooled(r.reshape(r.shape[0], -1).sum(-1))

        out.register_hook(hook)

    def add_rows(self, deficit: Tensor) -> None:
        """The softmax rule's bias ``(B, H, Lq)`` (:func:`~attnkit.explain._lrp_rules.softmax_bias`): each query
        row's share goes to its query token (the token whose representation the attention output enters)."""
        x = self.start["x"]
        d = deficit.double().reshape(x.shape[0], -1, deficit.shape[-1]).sum(1)  # (B, Lq)
        if d.shape[1] == x.shape[1]:
            self._add_tokens(d)
        else:  # queries that are not the first layer's tokens (cross-attention from another sequence)
            self._add_pooled(d.sum(-1))

    def _add_tokens(self, r: Tensor) -> None:
        self.token = r if self.token is None else self.token + r

    def _add_pooled(self, r: Tensor) -> None:
        self.pooled = r if self.pooled is None else self.pooled + r

    def add_to(self, relevance: Tensor) -> Tensor:
        """``relevance`` plus the token biases; the pooled ones split over the tokens in proportion to ``|R|``."""
        if self.token is not None:
            relevance = relevance + self.token
        if self.pooled is not None:
            weight = relevance.abs()
            total = weight.sum(-1, keepdim=True)
            even = torch.full_like(weight, 1 / weight.shape[-1])
            share = torch.where(total > 0, weight / total.clamp_min(torch.finfo(weight.dtype).tiny), even)
            relevance = relevance + share * self.pooled[:, None]
        return relevance


def _ffn_activation(layer: nn.Module, stack: ExitStack) -> None:
    """attnkit's layers apply their activation as a function: ``linear2``'s input ``f(h)`` gets the identity
    rule against ``h``, the output of ``linear1``."""
    seen: dict[str, Tensor] = {}

    def keep(_m, _a, out):
        seen["h"] = out

    def rewrite(_m, args):
        (a,) = args
        h = seen.pop("h", None)
        if h is None or h.shape != a.shape:
            raise RuntimeError("lrp: expected linear2 to read activation(linear1(x)) (the attnkit FFN)")
        return (rules.identity_rule(h, a),)

    stack.callback(layer.linear1.register_forward_hook(keep).remove)
    stack.callback(layer.linear2.register_forward_pre_hook(rewrite).remove)


def _attention_rule(rule: str, biases: _BiasRelevance | None, seen: list[int]):
    fq, fk, fv = _ATTENTION_FACTORS[rule]

    def intercept(spec, run):
        seen.append(1)
        q, k, v = rules.scale_grad(spec.query, fq), rules.scale_grad(spec.key, fk), rules.scale_grad(spec.value, fv)
        out, probs, lse = math_forward(replace(spec, query=q, key=k, value=v, dropout_p=0.0), need_lse=spec.return_lse)
        if biases is not None and rule == "attnlrp":
            rules.softmax_bias(probs, biases.add_rows)
        weights = probs.to(spec.query.dtype) if spec.return_weights else None
        return out, weights, (lse if spec.return_lse else None)

    return intercept


def lrp(
    model: nn.Module,
    inputs: Any,
    target: int | Tensor | Callable[[Any], Tensor],
    *,
    rule: str = "attnlrp",
    conserve: bool = True,
    pixels: bool | None = None,
    pixel_rule: str = "zb",
    bounds: tuple[Any, Any] | None = None,
) -> LRPResult:
    """Explain ``model(inputs)`` with AttnLRP or CP-LRP (rules in the module docstring), one forward and backward.

    Args:
        model: an attnkit transformer (built from :class:`attnkit.nn.TransformerEncoderLayer` /
            :class:`attnkit.nn.MultiHeadAttention`) or a Hugging Face model with ``attn_implementation="attnkit"``
            (see :mod:`attnkit.integrations.transformers`); call ``model.eval()`` first.
        inputs: a dict (``model(**inputs)``), a tuple (``model(*inputs)``) or one tensor.
        target: the class to explain (an int or ``(B,)`` indices into the logits), or a callable
            ``output -> (B,)`` scores (as :func:`attnkit.explain.relevance`).
        rule: ``"attnlrp"`` (Achtibat et al. 2024) or ``"cp-lrp"`` (attention as constant, Ali et al. 2022).
        conserve: let no bias and no softmax absorb relevance (module docstring): the input relevance then
            sums to the score. ``False``: the published rules (``lxt``'s values).
        pixels: explain the pixels of an image input through the model's convolutional patch stem
            (:mod:`attnkit.explain._lrp_pixels`): ``None`` (default) when ``inputs`` hold one ``(B, C, Hi, Wi)``
            floating tensor and a supported stem reads it, else tokens; ``True``: pixels or an error;
            ``False``: tokens.
        pixel_rule: the rule of the first convolution: ``"zb"`` (default, Montavon et al. 2017's z^B for
            bounded pixels), ``"w2"`` or ``"lrp-0"`` (gradient x input).
        bounds: ``(low, high)`` the range of the (preprocessed) pixels for ``"zb"``, numbers or tensors
            broadcastable to the image (per channel: ``(C, 1, 1)``); default each image's own per-channel
            minimum and maximum.

    Returns:
        :class:`LRPResult`: ``relevance`` ``(B, Hi, Wi)`` (pixels) or ``(B, L)`` (tokens), ``conservation``
        ``(B,)``, ``logit`` ``(B,)``, ``token_relevance`` ``(B, L)``; relevance in float64.

    Raises:
        ValueError: an unknown rule or pixel rule; no transformer layers found, or no attention call went
            through attnkit (a Hugging Face model not loaded with ``attn_implementation="attnkit"``);
            ``pixels=True`` without one image among the inputs or without a supported stem (the modules that
            are not supported are named; BatchNorm must be in eval mode); pixels outside ``bounds``.
        TypeError: logits not found or a target callable that returns no tensor; bad ``pixels``/``bounds``.

    References:
        Achtibat et al. 2024, "AttnLRP: Attention-Aware Layer-Wise Relevance Propagation for Transformers",
        ICML, Sec. 3 (Prop. 3.1 softmax rule, Prop. 3.2 uniform rule, Eq. 9 identity rule); Ali et al. 2022,
        "XAI for Transformers: Better Explanations through Conservative Propagation", ICML (LN-rule, CP-LRP);
        Montavon et al. 2019, "Layer-Wise Relevance Propagation: An Overview" (LRP-0, gradient x input form;
        Sec. 10.3.2, z^B and w² for the input layer); Montavon et al. 2017, "Explaining nonlinear classification
        decisions with deep Taylor decomposition", Pattern Recognition 65 (z^B and w² rules).
    """
    if rule not in _ATTENTION_FACTORS:
        raise ValueError(f"lrp: rule must be one of {', '.join(map(repr, _ATTENTION_FACTORS))}, got {rule!r}")
    if not isinstance(conserve, bool):
        raise TypeError(f"lrp: conserve must be a bool, got {conserve!r}")
    if pixels not in (None, True, False):
        raise TypeError(f"lrp: pixels must be None, True or False, got {pixels!r}")
    if pixel_rule not in PIXEL_RULES:
        raise ValueError(f"lrp: pixel_rule must be one of {', '.join(map(repr, PIXEL_RULES))}, got {pixel_rule!r}")
    if conserve and _encoder_decoder(model):
        raise ValueError(
            "lrp: conserve=True needs an encoder-only or decoder-only model; for an encoder-decoder model the "
            "relevance is read at the encoder's input and the decoder's inputs keep theirs: pass conserve=False"
        )
    first = _first_layer(model)
    image = find_image(inputs) if pixels is not False else None
    if pixels and image is None:
        raise ValueError("lrp: pixels=True needs inputs holding exactly one (B, C, Hi, Wi) floating image tensor")
    stem = PixelStem(image.shape, pixel_rule, bounds) if image is not None else None
    start: dict[str, Tensor] = {}
    calls: list[int] = []

    def take(t: Tensor) -> Tensor:  # the first layer's input: a leaf, or kept on the stem's graph for pixels
        use_stem = stem is not None and stem.close() and stem.patch_tokens(t.shape[1])
        start["x"] = t if use_stem else t.detach().requires_grad_(True)
        start["stem"] = use_stem
        return start["x"]

    def leaf(_m, args, kwargs):
        if "x" in start:
            return None
        if args and isinstance(args[0], Tensor):
            return (take(args[0]), *args[1:]), kwargs
        for name in ("hidden_states", "x"):
            if isinstance(kwargs.get(name), Tensor):
                return args, {**kwargs, name: take(kwargs[name])}
        raise ValueError(f"lrp: cannot find the hidden states in the call of {type(_m).__name__}")

    with ExitStack() as stack, torch.enable_grad():
        stack.callback(first.register_forward_pre_hook(leaf, with_kwargs=True).remove)
        _install(model, stack, rule)
        if stem is not None:
            stem.install(model, stack)
        biases = _BiasRelevance(start)
        if conserve:
            biases.install(model, stack)
        stack.enter_context(observe.interceptor(_attention_rule(rule, biases if conserve else None, calls)))
        output = call_model(model, inputs)
        x = start.get("x")
        if x is None:
            raise ValueError(f"lrp: the first transformer layer ({type(first).__name__}) did not run")
        if not calls:
            raise ValueError(
                "lrp: no attention call went through attnkit; load Hugging Face models with "
                'attn_implementation="attnkit" (attnkit.integrations.transformers.register())'
            )
        if pixels and not start["stem"]:
            raise ValueError(f"lrp: pixels=True but {_no_stem(stem)}")
        scores = _per_item_scores(output, target, x.shape[0])
        wrt = [x, *stem.grad_inputs()] if start["stem"] else [x]
        grads = torch.autograd.grad(scores.sum(), wrt)
    relevance = (x.detach().double() * grads[0].double()).sum(-1)
    if conserve:
        relevance = biases.add_to(relevance)
    tokens = relevance
    if start["stem"]:
        relevance = stem.relevance(list(grads[1:]), tokens if conserve else None)
    logit = scores.detach().double()
    total = relevance.reshape(relevance.shape[0], -1).sum(-1)
    conservation = (total - logit).abs() / logit.abs().clamp_min(torch.finfo(torch.float64).tiny)
    return LRPResult(relevance, conservation, logit, output, tokens)


def _no_stem(stem: PixelStem) -> str:
    if stem.pixels is None:
        return f"no nn.Conv2d read the image {stem.image_shape} before the first transformer layer"
    if stem.unsupported:
        return f"the patch stem runs modules without a pixel rule: {', '.join(sorted(set(stem.unsupported)))}"
    return "the first transformer layer's tokens do not end with one token per cell of the stem's output grid"


def _per_item_scores(output: Any, target, batch: int) -> Tensor:
    """``(B,)`` scores by :func:`attnkit.explain.relevance`'s target rules (summed within an item)."""
    scores = target_scores(output, target)
    if scores.numel() % batch:
        raise ValueError(f"lrp: the target scores {tuple(scores.shape)} do not split into B={batch} items")
    return scores.reshape(batch, -1).sum(-1)
