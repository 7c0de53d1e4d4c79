"""The ``"sdpa"`` backend: PyTorch's fused ``scaled_dot_product_attention`` kernels, with attnkit's semantics.

What it adds on top of a direct call:

* ``is_causal`` / ``window_size`` bottom-right aligned (torch's ``is_causal`` is top-left; it is passed through
  only when ``Lq == Lk``, where both agree, and otherwise an explicit mask is built);
* ALiBi, ``attn_bias`` and float/bool masks folded into one additive mask;
* rows with no key to attend to give output 0, lse ``-inf`` and zero gradients on every torch version: such rows
  are unmasked for the kernel (so it never divides by zero) and zeroed afterwards;
* grouped-query attention without copying K/V (``enable_gqa``, torch >= 2.5);
* ``return_lse`` on CPU, through ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel
  ``F.scaled_dot_product_attention`` runs there for large inputs), whose log-sum-exp equals
  ``logsumexp(scale * q @ k^T + mask, -1)``.

Not supported (``auto`` falls back): ``softcap``, ``return_weights``; in float16/bfloat16, float terms that
would have to be rounded to the query dtype (ALiBi, or ``attn_bias`` not already in that dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.functional.registry import Backend, register
from attnkit.functional.spec import AttentionSpec, lse_dtype
from attnkit.functional.tiles import TileSetup, to_heads, whole

__all__ = ["CPU_FLASH", "kernel_mask_from_keep", "sdpa_attention"]

#: ``aten::_scaled_dot_product_flash_attention_for_cpu`` (returns ``(output, logsumexp)``), or None.
CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_HAS_ENABLE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
_LOW_PRECISION = (torch.float16, torch.bfloat16)

#: Set to False to refuse ``return_lse`` rather than use the CPU flash op (the tests cover both paths).
use_cpu_flash_op = True


def _needs_grad(spec: AttentionSpec) -> bool:
    tensors = (spec.query, spec.key, spec.value, spec.attn_mask, spec.attn_bias, spec.alibi_slopes)
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _use_cpu_flash(spec: AttentionSpec) -> bool:
    """Use the CPU flash op for ``return_lse`` only (F.sdpa has a lower fixed cost on small inputs).

    It serves CPU tensors with equal query/value head sizes and no differentiable mask; its lse output has no
    gradient, so it serves only calls that need none.
    """
    return (
        spec.return_lse
        and use_cpu_flash_op
        and not _needs_grad(spec)
        and CPU_FLASH is not None
        and spec.query.device.type == "cpu"
        and spec.query.shape[-1] == spec.value.shape[-1]
        and spec.dropout_p == 0.0  # the CPU flash op raises for dropout > 0
        and not any(t is not None and t.requires_grad for t in (spec.attn_mask, spec.attn_bias, spec.alibi_slopes))
    )


def _check(spec: AttentionSpec) -> str | None:
    if spec.return_lse and not _use_cpu_flash(spec):
        return (
            "return_lse needs the CPU flash kernel (CPU tensors, D == Dv, no dropout, no gradients: its lse is "
            "not differentiable); F.scaled_dot_product_attention does not return it"
        )
    if spec.query.dtype in _LOW_PRECISION:
        if spec.alibi_slopes is not None:
            return f"ALiBi biases would be rounded to {spec.query.dtype} for the fused kernel"
        floats = [t for t in (spec.attn_bias, spec.attn_mask) if t is not None and t.dtype != torch.bool]
        if len(floats) > 1 or any(t.dtype != spec.query.dtype for t in floats):
            return f"float masks/biases would be rounded to {spec.query.dtype} for the fused kernel"
    return None


def _as_4d(t: Tensor) -> Tensor:
    """``(*batch, H, L, D)`` -> ``(B, H, L, D)`` with the batch dims flattened, unit stride in the last dim.

    torch 2.13's CPU flash op returns wrong values when the head_dim stride is not 1 (``F.sdpa`` copies
    such inputs first); so do we.
    """
    t = t.contiguous() if t.stride(-1) != 1 else t
    return t.reshape((-1, *tuple(t.shape[-3:])))


def kernel_mask_from_keep(keep: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A bool keep-mask ``(..., Lq, Lk)`` as the fused kernel's additive mask (0 / ``-inf``) in ``dtype``, with
    rows that keep nothing left unmasked (so the kernel never divides by zero), and those rows ``(..., Lq, 1)``:
    the caller zeroes their output and sets their lse to ``-inf``."""
    empty = ~keep.any(dim=-1, keepdim=True)
    mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~(keep | empty), -torch.inf)
    return mask, empty


def _kernel_mask(spec: AttentionSpec) -> tuple[Tensor | None, bool, Tensor | None]:
    """``(mask (B'|1, H|1, Lq|1, Lk) in the query dtype or None, pass is_causal to torch, empty-row flags or None)``.

    The terms come from :class:`~attnkit.functional.tiles.TileSetup` (the one definition), as one tile.
    """
    dtype = spec.query.dtype
    only_causal = spec.is_causal and spec.window_size is None
    plain = spec.attn_mask is None and spec.attn_bias is None and spec.alibi_slopes is None
    if only_causal and plain and spec.q_len == spec.kv_len:
        return None, True, None
    if plain and not spec.is_causal and spec.window_size is None:  # nothing to mask: no tile to build
        return None, False, None
    setup = TileSetup(spec)
    bias, keep = setup.terms(whole(spec))
    if bias is None and keep is None:
        return None, False, None
    if keep is not None:
        keep = to_heads(keep, setup.Hkv, setup.G)
    if bias is None:
        mask, empty = kernel_mask_from_keep(keep, dtype)
    else:
        mask = to_heads(bias, setup.Hkv, setup.G).to(dtype)
        if keep is not None:
            mask = mask.masked_fill(~keep, float("-inf"))
        empty = torch.isneginf(mask).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(empty, 0.0)
    return mask, False, (empty if bool(empty.any()) else None)


def sdpa_attention(spec: AttentionSpec) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run ``spec`` on torch's fused SDPA kernel; see the module docstring for what is fixed on top.

    Returns:
        ``(output, None, lse or None)``.
    """
    q, k, v = spec.query, spec.key, spec.value
    mask4, torch_causal, empty = _kernel_mask(spec)
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    lse = None
    if _use_cpu_flash(spec):
        out, lse = CPU_FLASH(q4, k4, v4, spec.dropout_p, torch_causal, attn_mask=mask4, scale=spec.scale)
    else:
        gqa = spec.num_kv_heads != spec.num_heads
        if gqa and not _HAS_ENABLE_GQA:
            group = spec.num_heads // spec.num_kv_heads
            k4, v4 = k4.repeat_interleave(group, dim=-3), v4.repeat_interleave(group, dim=-3)
        extra = {"enable_gqa": True} if gqa and _HAS_ENABLE_GQA else {}
        out = F.scaled_dot_product_attention(
            q4,
            k4,
            v4,
            attn_mask=mask4,
            dropout_p=spec.dropout_p,
            is_causal=torch_causal,
            scale=spec.scale,
            **extra,
        )
    if empty is not None:  # (B'|1, H|1, Lq|1, 1) against the kernel's (B, H, Lq, Dv)
        out = out.masked_fill(empty, 0.0)
        if lse is not None:
            lse = lse.masked_fill(empty.squeeze(-1), float("-inf"))
    out = out.reshape((*q.shape[:-1], v.shape[-1]))
    if lse is not None:
        lse = lse.reshape(q.shape[:-1])
    return out, None, (lse.to(lse_dtype(q.dtype)) if spec.return_lse else None)


SDPA = register(
    Backend(
        name="sdpa",
        forward=sdpa_attention,
        options=frozenset(
            {
                "attn_mask_bool",
                "attn_mask_float",
                "is_causal",
                "window_size",
                "attn_bias",
                "alibi_slopes",
                "dropout_p",
                "return_lse",
                "gqa",
            }
        ),
        priority=10,
        description="torch's fused scaled_dot_product_attention kernels; bottom-right causal; no NaN rows",
        check=_check,
    )
)
