"""An independent float64 attention reference and the per-dtype tolerance rules, shared by the tests.

Written directly from the definitions (explicit index arithmetic, ``repeat_interleave`` for GQA, ``torch.softmax``
per row) rather than from attnkit's code, so that attnkit's ``math`` backend is checked against it and every other
backend against ``math``.
"""

from __future__ import annotations

import torch

#: Tolerances against the float64 reference, per input dtype: (atol, rtol).
#: float32: the brief's "within 1e-5 relative" (plus a tiny atol for values near 0).
#: float16 / bfloat16: FlashAttention's rule, error <= 2 x (error of a naive same-dtype computation) + atol.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-6, 1e-5),
    torch.float16: (2e-3, 0.0),
    torch.bfloat16: (1e-2, 0.0),
}
LOW_PRECISION_FACTOR = 2.0


def reference_attention(
    q,
    k,
    v,
    *,
    attn_mask=None,
    is_causal=False,
    window_size=None,
    attn_bias=None,
    alibi_slopes=None,
    softcap=None,
    scale=None,
    sinks=None,
    mask_mod=None,
    score_mod=None,
    block_mask=None,
    compute_dtype=torch.float64,
):
    """Return ``(output, weights, lse)`` computed in ``compute_dtype`` straight from the definitions.

    ``sinks`` ``(H,)`` or ``(B..., H)``: an extra logit per head in each row's softmax, with value 0 (its column is
    dropped from the weights). ``mask_mod``/``score_mod`` are evaluated on full index grids; ``block_mask`` through
    its dense form.
    """
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    H, Lq, D = q.shape[-3:]
    Hkv, Lk = k.shape[-3], k.shape[-2]
    k = k.repeat_interleave(H // Hkv, dim=-3)
    v = v.repeat_interleave(H // Hkv, dim=-3)
    scale = D**-0.5 if scale is None else scale
    s = torch.einsum("...id,...jd->...ij", q, k) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    nb = 1
    for n in q.shape[:-3]:
        nb *= n
    bi = torch.arange(nb).view(*q.shape[:-3], 1, 1, 1) if q.ndim > 3 else torch.zeros((), dtype=torch.long)
    hi = torch.arange(H).view(H, 1, 1)
    qi, ki = torch.arange(Lq).view(-1, 1), torch.arange(Lk).view(1, -1)
    if score_mod is not None:
        s = score_mod(s, bi, hi, qi, ki).expand(s.shape).to(compute_dtype)
    i = torch.arange(Lq).view(-1, 1) + (Lk - Lq)  # bottom-right: query i sits at key position i + Lk - Lq
    j = torch.arange(Lk).view(1, -1)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if is_causal:
        allowed &= j <= i
    if window_size is not None:
        left, right = (window_size, window_size) if isinstance(window_size, int) else window_size
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
    if attn_bias is not None:
        s = s + attn_bias.to(compute_dtype)
    if alibi_slopes is not None:
        s = s - alibi_slopes.to(compute_dtype)[..., None, None] * (i - j).abs().to(compute_dtype)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask.to(compute_dtype)
    if mask_mod is not None:
        allowed = allowed & mask_mod(bi, hi, qi, ki)
    if block_mask is not None:
        allowed = allowed & block_mask.to_dense()
    allowed = allowed.expand(s.shape)
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:  # softmax over [scores, sink], the sink column dropped
        sink = sinks.to(compute_dtype)[..., None, None].expand(*s.shape[:-1], 1)
        full = torch.cat([s, sink], dim=-1)
        p = torch.softmax(full, dim=-1)[..., :-1]
        return p @ v, p, torch.logsumexp(full, dim=-1)
    empty = torch.isneginf(s).all(dim=-1, keepdim=True)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    lse = torch.logsumexp(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty.squeeze(-1), float("-inf"))
    out = p @ v
    return out, p, lse


def assert_close_to_reference(actual, expected, *, dtype, baseline=None, msg=""):
    """Check ``actual`` against the float64 ``expected`` under the dtype's rule.

    For float16/bfloat16, ``baseline`` (a naive same-dtype computation) sets the bar:
    ``max|actual - expected| <= 2 * max|baseline - expected| + atol``.
    """
    atol, rtol = TOLERANCES[dtype]
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    if dtype in (torch.float16, torch.bfloat16):
        assert baseline is not None, "low-precision checks need a same-dtype baseline"
        err = (actual - expected).abs().max().item() if actual.numel() else 0.0
        base = (baseline.to(torch.float64) - expected).abs().max().item() if actual.numel() else 0.0
        bound = LOW_PRECISION_FACTOR * base + atol
        if not err <= bound:
            raise AssertionError(f"{msg} error {err:.3g} > 2 x baseline {base:.3g} + atol {atol:g}")
        return
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def naive_low_precision(q, k, v, **kwargs):
    """The same-dtype baseline: every step in the inputs' dtype, no float32 upcast (FlashAttention's ref)."""
    out, p, lse = reference_attention(q, k, v, compute_dtype=q.dtype, **kwargs)
    return out, p, lse
