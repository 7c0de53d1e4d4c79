"""The LRP rules of :func:`attnkit.explain.lrp`, each as a forward that keeps the value and rewires the gradient.

In the gradient form of LRP the relevance of a tensor ``t`` is ``t ⊙ ∂̃s/∂t``, where ``∂̃`` is the gradient with
each operation's backward replaced by its rule. Every rule here is written as :func:`rewire`: the output keeps
its exact value while its gradient is that of a *linear* surrogate ``expr`` (the rule), so the model's outputs
are bit-identical with and without the rules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = [
    "ACTIVATIONS",
    "identity_rule",
    "is_activation",
    "layer_norm_rule",
    "rewire",
    "rms_norm_rule",
    "scale_grad",
    "softmax_bias",
]


#: Activation modules that get the identity rule (and those of ``transformers.activations``).
ACTIVATIONS = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU)


def is_activation(m: nn.Module) -> bool:
    """Whether ``m`` is an element-wise activation module (gets :func:`identity_rule`)."""
    return isinstance(m, ACTIVATIONS) or type(m).__module__ == "transformers.activations"


class _Rewire(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, expr: Tensor) -> Tensor:
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def rewire(value: Tensor, expr: Tensor) -> Tensor:
    """``value`` in the forward, the gradient of ``expr`` (same shape) in the backward."""
    return _Rewire.apply(value, expr)


def scale_grad(x: Tensor, factor: float) -> Tensor:
    """``x`` in the forward; the gradient times ``factor`` in the backward (0 detaches)."""
    if factor == 0.0:
        return x.detach()
    return x if factor == 1.0 else _ScaleGrad.apply(x, factor)


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where ``den == 0`` (detached)."""
    den = den.detach()
    safe = torch.where(den == 0, torch.ones_like(den), den)
    return torch.where(den == 0, torch.zeros_like(den), num.detach() / safe)


def identity_rule(h: Tensor, out: Tensor) -> Tensor:
    """Element-wise ``out = f(h)``: relevance passes from ``out`` to ``h`` unchanged (Achtibat et al. 2024, Eq. 9):
    ``∂̃f(h)/∂h = f(h) / h``."""
    return rewire(out, h * _ratio(out, h))


def layer_norm_rule(x: Tensor, out: Tensor, normalized_dims: int, eps: float, weight) -> Tensor:
    """LayerNorm as a linear map plus its shift: the deviation is a constant (Ali et al. 2022 LN-rule; ``lxt``'s
    ``layer_norm_forward``)."""
    dims = tuple(range(-normalized_dims, 0))
    centred = x - x.mean(dims, keepdim=True)
    std = (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
    z = centred / std
    return rewire(out, z * weight if weight is not None else z)


def rms_norm_rule(x: Tensor, out: Tensor, eps: float, weight) -> Tensor:
    """RMSNorm with the root mean square treated as a constant (``lxt``'s ``rms_norm_forward``)."""
    z = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt().detach()
    return rewire(out, z * weight if weight is not None else z)


def softmax_bias(probs: Tensor, sink) -> None:
    """Report the relevance the AttnLRP softmax rule absorbs, per query row, to ``sink((*batch, H, Lq) tensor)``.

    With the gradient factors of :func:`attnkit.explain.lrp` (1/4 on queries and keys, 1/2 on values), the
    gradient ``g`` arriving at the attention weights ``A`` is twice the LRP message: the relevance arriving at a
    row of ``A`` is ``½ Σ_j A_j g_j`` and the rule (Achtibat et al. 2024, Prop. 3.1, in gradient form) passes
    ``½ Σ_j S_j A_j (g_j - Σ_k A_k g_k)`` on to the scores ``S``. With ``S_j = log A_j + lse`` for the keys
    attended to, ``lse`` cancels in the centred sum, so only ``A`` is needed; masked keys (``A_j = 0``) add
    nothing. The difference, the rule's bias term, is what ``sink`` receives.
    """
    if not probs.requires_grad:
        return

    def hook(g: Tensor) -> None:
        a = probs.detach().to(g.dtype)
        arriving = (a * g).sum(-1, keepdim=True)
        passed = (torch.xlogy(a, a) * (g - arriving)).sum(-1)
        sink(0.5 * (arriving[..., 0] - passed))

    probs.register_hook(hook)
