"""Cases shared by the context-parallel tests and the worker processes they spawn (``ring_worker.py``).

Each case is a global call (full sequence of length ``L``) whose inputs are generated from a fixed seed, so the
worker (sharded) and the test (float64 reference on the whole sequence) build identical tensors.
"""

from __future__ import annotations

import torch

import attnkit
from attnkit import sparse

L = 48
DOCS = [5, 17, 3, 20, 3]  # packed documents, sum L; block 8 cuts through documents and zigzag chunks

CASES = {
    "full": {},
    "causal": {"is_causal": True},
    "window": {"window_size": (5, 3)},
    "causal_window": {"is_causal": True, "window_size": (7, 0)},
    "alibi_causal": {"is_causal": True, "alibi": True},
    "alibi_window": {"window_size": (9, 4), "alibi": True},
    "softcap_gqa": {"is_causal": True, "softcap": 2.0, "num_kv_heads": 2},
    "document": {"document": False},
    "document_causal": {"document": True},
    "mods": {"mods": True, "num_kv_heads": 1},
    # without a gradient of the lse the backward of plain and causal blocks runs torch's fused CPU kernel
    "full_out_only": {"out_only": True},
    "causal_gqa_out_only": {"is_causal": True, "num_kv_heads": 2, "out_only": True},
    # attention sinks join every row's softmax once (gradients of the sinks summed over the ranks)
    "sinks_window": {"window_size": (6, 2), "sinks": True},
    "sinks_causal_out_only": {"is_causal": True, "sinks": True, "out_only": True, "num_kv_heads": 2},
}
#: The cases also run on 4 processes (4 processes share this machine's 2 cores, so the list is kept short).
CASES_P4 = ("causal", "causal_window", "alibi_window", "softcap_gqa", "document_causal", "sinks_causal_out_only")
#: bfloat16 blocks on the same kernel as the one-process call they are compared with, so that the difference is
#: the merge's
BF16_CASE = {"is_causal": True, "length": 256, "head_dim": 32, "backend": "tiled"}


def _mask_mod(b, h, q_idx, kv_idx):
    return ((q_idx + kv_idx) % 3 != 0) | (q_idx == kv_idx)


def _score_mod(score, b, h, q_idx, kv_idx):
    return score + 0.05 * torch.sin((q_idx - 2 * kv_idx).float()) + 0.1 * h


def build(case: dict, dtype=torch.float32, seed: int = 0):
    """``(q, k, v, grad_out, grad_lse, options)`` for the whole sequence (grads in float64; ``grad_lse`` is
    ``None`` when the loss does not use the lse)."""
    length, num_heads = case.get("length", L), 4
    num_kv_heads, head_dim = case.get("num_kv_heads", num_heads), case.get("head_dim", 16)
    gen = torch.Generator().manual_seed(seed)
    q = 2 * torch.randn(2, num_heads, length, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(2, num_kv_heads, length, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(2, num_kv_heads, length, head_dim, generator=gen, dtype=torch.float64)
    g_out = torch.randn(2, num_heads, length, head_dim, generator=gen, dtype=torch.float64)
    g_lse = torch.randn(2, num_heads, length, generator=gen, dtype=torch.float64)
    if case.get("out_only"):
        g_lse = None
    opts = {key: case[key] for key in ("is_causal", "window_size", "softcap", "backend") if key in case}
    if case.get("alibi"):
        opts["alibi_slopes"] = attnkit.masks.alibi_slopes(num_heads)
    if "document" in case:
        opts["block_mask"] = sparse.document(DOCS, is_causal=case["document"], block_size=8)
    if case.get("mods"):
        opts["mask_mod"], opts["score_mod"] = _mask_mod, _score_mod
    if case.get("sinks"):
        opts["sinks"] = torch.randn(num_heads, generator=gen)
    return q.to(dtype), k.to(dtype), v.to(dtype), g_out, g_lse, opts


def reference(q, k, v, g_out, g_lse, opts):
    """float64 ``attnkit.attention`` ("math" backend) on the whole sequence: ``(out, lse, dq, dk, dv, dsinks)``."""
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref_opts = {key: val for key, val in opts.items() if key != "backend"}
    for name in ("alibi_slopes", "sinks"):
        if name in ref_opts:
            ref_opts[name] = ref_opts[name].detach().double().requires_grad_(name == "sinks")
    res = attnkit.attention(q, k, v, return_lse=True, backend="math", **ref_opts)
    loss = (res.output * g_out).sum()
    (loss if g_lse is None else loss + (res.lse * g_lse).sum()).backward()
    dsinks = ref_opts["sinks"].grad if "sinks" in ref_opts else None
    return res.output.detach(), res.lse.detach(), q.grad, k.grad, v.grad, dsinks


NN_CASES = ("encoder_rope_gqa", "mha_alibi")


def build_module(name: str, group=None, layout: str = "contiguous"):
    """``(module, x (2, L, 32), grad_out, forward kwargs)``; ``group`` makes the module context-parallel."""
    torch.manual_seed(0)
    cp = {"context_parallel_group": group, "context_parallel_layout": layout}
    if name == "encoder_rope_gqa":
        rope = attnkit.nn.RotaryEmbedding(8)
        module = attnkit.nn.TransformerEncoderLayer(32, 4, num_kv_heads=2, rope=rope, norm_first=True, **cp)
        kwargs = {"is_causal": True}
    else:
        module = attnkit.nn.MultiHeadAttention(32, 4, alibi=True, **cp)
        kwargs = {}
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, L, 32, generator=gen)
    g = torch.randn(2, L, 32, generator=gen)
    return module, x, g, kwargs


def module_output(module, x, kwargs):
    out = module(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out
