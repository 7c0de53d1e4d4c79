"""``attn_implementation="attnkit"``: run Hugging Face transformers models on :func:`attnkit.attention`.

Three lines::

    from attnkit.integrations.transformers import register
    register()                                   # -> "attnkit"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnkit")

(or ``model.set_attn_implementation("attnkit")`` on a loaded model). :func:`register` adds two functions to
transformers' registries: :func:`attention_forward` to ``AttentionInterface`` and
:func:`attnkit.integrations._hf_mask.hf_mask` to ``AttentionMaskInterface`` (without the latter HF would pass no
mask at all and padding would be silently ignored).

What is honoured, per call: grouped-query attention without repeating K/V; left and right padding from the 2-D
mask as a ``(B, 1, 1, Lk)`` mask (no ``(B, 1, Lq, Lk)`` tensor for the standard causal, sliding-window and
bidirectional patterns); causal attention bottom-right aligned to HF's cache offsets, including a static cache's
prefill; each layer's ``sliding_window`` (HF counts the token itself: attnkit ``window_size=(w - 1, 0)``);
``softcap`` (Gemma 2); ``s_aux`` attention sinks (gpt-oss); ``position_bias`` (T5) as ``attn_bias``;
``scaling``; ``dropout`` (HF passes it only in training); cross-attention. With ``output_attentions=True`` the
weights come back from the same call (``(B, H, Lq, Lk)``, rows of padded queries 0 where HF's eager gives
uniform rows).

Long prompts: once a call has at least :data:`LONG_PROMPT_SCORES` scores per head (``Lq · Lk``), a call
with a sliding window runs on ``"blocksparse"`` (work and memory ``O(L · window)``) and a call that torch's
fused kernel could only serve with a dense mask (``softcap``, sinks, padding under a causal mask) runs on
``"tiled"`` (memory ``O(L)``): no ``Lq x Lk`` tensor is built above that size unless the weights are requested
(they are ``Lq x Lk`` themselves) or HF itself hands over an ``Lq x Lk`` tensor (T5's ``position_bias``,
a custom 4-D mask, an unrecognised mask pattern).

Any keyword HF passes that this adapter does not know raises ``ValueError`` naming it, rather than being
dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit.functional.attention import attention
from attnkit.integrations._hf_mask import HFMask, hf_mask

__all__ = ["LONG_PROMPT_SCORES", "attention_forward", "choose_backend", "register"]

#: Scores per head (``Lq · Lk``) from which long-prompt routing applies: 2048 x 2048.
LONG_PROMPT_SCORES = 1 << 22

#: Keywords HF passes to attention functions that do not change the attention computed here: positions and cache
#: bookkeeping (already folded into the mask), flash-attention's varlen metadata (the mask carries the same
#: information), output flags.
_NEUTRAL_KWARGS = frozenset(
    {
        "position_ids",
        "cache_position",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "output_router_logits",
        "return_dict",
        "cu_seq_lens_q",
        "cu_seq_lens_k",
        "max_length_q",
        "max_length_k",
        "layer_idx",
        "token_type_ids",
    }
)

#: Names transformers treats specially: a name containing one of these gets HF's own capability checks
#: (sdpa/flash/flex) or is reserved.
_RESERVED_SUBSTRINGS = ("sdpa", "flash", "flex", "eager", "paged")

_REGISTERED: dict[str, str] = {}  # name -> attnkit backend


def _num_scores(q_len: int, kv_len: int) -> int:
    return q_len * kv_len


def choose_backend(
    q_len: int,
    kv_len: int,
    *,
    window: tuple[int, int] | None,
    softcap: float | None,
    sinks: Tensor | None,
    padded_causal: bool,
    return_weights: bool,
    backend: str = "auto",
) -> str:
    """The attnkit backend for one HF attention call (see the module docstring, "Long prompts").

    Args:
        q_len: ``Lq``.
        kv_len: ``Lk``.
        window: the call's ``window_size`` or ``None``.
        softcap: the call's ``softcap`` or ``None``.
        sinks: the call's sinks or ``None``.
        padded_causal: a padding mask together with a causal mask (torch's fused kernel would need them
            combined into one dense mask).
        return_weights: the weights are requested (only ``"math"`` returns them; they are ``Lq x Lk`` anyway).
        backend: the backend named at :func:`register`; anything but ``"auto"`` is returned unchanged.

    Returns:
        a backend name for :func:`attnkit.attention`.
    """
    if backend != "auto" or return_weights or _num_scores(q_len, kv_len) < LONG_PROMPT_SCORES:
        return backend
    if window is not None and -1 not in window:
        return "blocksparse"
    if softcap is not None or sinks is not None or padded_causal:
        return "tiled"
    return "auto"


def _collecting_attentions() -> bool:
    """Whether transformers is collecting attention weights right now (``output_attentions`` given to the model
    or set in its config reaches attention functions only through HF's output-capturing hooks)."""
    try:
        from transformers.utils.output_capturing import _active_collector

        collected = _active_collector.get() or {}
    except (ImportError, AttributeError, TypeError):  # other versions pass output_attentions as a keyword
        return False
    return "attentions" in collected or "cross_attentions" in collected


def _unsupported(kwargs: dict) -> list[str]:
    return sorted(k for k, v in kwargs.items() if v is not None and k not in _NEUTRAL_KWARGS)


def attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: HFMask | Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: Tensor | None = None,
    position_bias: Tensor | None = None,
    is_causal: bool | None = None,
    backend: str = "auto",
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """transformers ``AttentionInterface`` function computing attention with :func:`attnkit.attention`.

    Args:
        module: the HF attention module (``is_causal``, ``training`` are read from it).
        query: ``(B, H, Lq, D)``.
        key: ``(B, Hkv, Lk, D)``, ``H % Hkv == 0`` (not repeated).
        value: ``(B, Hkv, Lk, Dv)``.
        attention_mask: an :class:`~attnkit.integrations._hf_mask.HFMask` from the registered mask function;
            a tensor broadcastable to ``(B, H, Lq, Lk)`` (a custom 4-D mask: bool True = may attend, or float
            added to the scores), used as the whole mask; or ``None``: causal if the module is (``is_causal``
            keyword first), top-left aligned like torch's SDPA (HF passes ``None`` only when that is what it
            means, e.g. a static cache's prefill).
        scaling: multiplies ``Q Kᵀ``; default ``1 / sqrt(D)``.
        dropout: attention dropout probability (HF passes 0 at evaluation).
        sliding_window: the layer's window in HF's convention (the token itself included), or ``None``.
        softcap: Gemma 2's logit soft-capping, or ``None``.
        s_aux: ``(H,)`` attention-sink logits (gpt-oss), or ``None``.
        position_bias: ``(B or 1, H, Lq, Lk)`` float bias added to the scores (T5), or ``None``.
        is_causal: overrides ``module.is_causal`` when the mask is ``None``.
        backend: the attnkit backend (fixed by :func:`register`); ``"auto"`` applies the long-prompt routing.
        **kwargs: other HF keywords; those that do not change attention (positions, cache bookkeeping, output
            flags) are ignored, any other non-``None`` one raises.

    Returns:
        ``(output (B, Lq, H, Dv), weights (B, H, Lq, Lk) or None)``; weights only with ``output_attentions``.

    Raises:
        ValueError: an HF keyword or mask this adapter cannot honour (named in the message), or a mask built
            for other lengths than ``query``/``key``.
    """
    bad = _unsupported(kwargs)
    if bad:
        raise ValueError(
            f"attnkit attention: transformers passed {', '.join(bad)}, which attn_implementation='attnkit' does not "
            f"support; use attn_implementation='eager' for this model"
        )
    q_len, kv_len = query.shape[-2], key.shape[-2]
    full_kv_len = kv_len
    want_weights = bool(kwargs.get("output_attentions")) or _collecting_attentions()
    sinks = _sinks(s_aux, query)
    attn_mask, causal, window, bias = None, False, None, position_bias
    hf_window = None if sliding_window is None else (int(sliding_window) - 1, 0)
    if isinstance(attention_mask, HFMask):
        m = attention_mask
        if (m.q_length, m.kv_length) != (q_len, kv_len):
            raise ValueError(
                f"attnkit attention: the mask was built for (Lq, Lk) = ({m.q_length}, {m.kv_length}), but the "
                f"layer's query/key have ({q_len}, {kv_len})"
            )
        if m.dense is not None:
            attn_mask = m.dense
        else:
            causal, window = m.is_causal, m.window
            if window is not None and hf_window is not None and window != hf_window:
                raise ValueError(
                    f"attnkit attention: the layer's sliding_window={sliding_window} disagrees with its mask's "
                    f"window {window}"
                )
            visible = m.visible_keys()
            if visible < kv_len:  # a static cache's empty slots: never seen by a causal query
                key, value = key[..., :visible, :], value[..., :visible, :]
                kv_len = visible
                if bias is not None and bias.shape[-1] != 1:
                    bias = bias[..., :visible]
            if m.padding is not None:
                attn_mask = m.padding[:, None, None, :kv_len]
    elif attention_mask is None:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False)) and q_len > 1
        window = hf_window
        if causal and kv_len > q_len:  # torch's top-left is_causal: keys past Lq are never seen
            key, value = key[..., :q_len, :], value[..., :q_len, :]
            kv_len = q_len
            if bias is not None and bias.shape[-1] != 1:
                bias = bias[..., :q_len]
    elif isinstance(attention_mask, Tensor):
        attn_mask = attention_mask
    else:
        raise ValueError(
            f"attnkit attention: expected the attention mask to come from attnkit's mask function, a tensor or "
            f"None, got {type(attention_mask).__name__}; was the model loaded with another implementation's masks?"
        )
    window = _effective_window(window, causal, q_len, kv_len)
    if bias is not None and bias.dtype != query.dtype:
        bias = bias.to(query.dtype)
    name = choose_backend(
        q_len,
        kv_len,
        window=window,
        softcap=softcap,
        sinks=sinks,
        padded_causal=causal and attn_mask is not None,
        return_weights=want_weights,
        backend=backend,
    )
    result = attention(
        query,
        key,
        value,
        attn_mask=attn_mask,
        is_causal=causal,
        window_size=window,
        attn_bias=bias,
        softcap=softcap,
        scale=scaling,
        dropout_p=float(dropout) if dropout else 0.0,
        return_weights=want_weights,
        sinks=sinks,
        backend=name,
    )
    if want_weights:
        out, weights = result.output, result.weights
        if kv_len < full_kv_len:  # report the columns HF's eager reports (the empty slots get 0)
            weights = torch.nn.functional.pad(weights, (0, full_kv_len - kv_len))
    else:
        out, weights = result, None
    return out.transpose(1, 2).contiguous(), weights


def _effective_window(window, causal: bool, q_len: int, kv_len: int) -> tuple[int, int] | None:
    """``window``, or ``None`` when it removes no key (bottom-right aligned: every row already sees all keys it
    could), e.g. Mistral's 4096-token window on a shorter prompt; the call then runs as plain causal attention."""
    if window is None:
        return None
    left, right = window
    left_free = left == -1 or left >= kv_len - 1
    right_free = causal or right == -1 or right >= q_len - 1
    return None if left_free and right_free else window


def _sinks(s_aux: Tensor | None, query: Tensor) -> Tensor | None:
    """gpt-oss's ``s_aux`` (one logit per head, ``(H,)``) as :func:`attnkit.attention`'s ``sinks``."""
    if s_aux is None:
        return None
    if not isinstance(s_aux, Tensor) or s_aux.shape[-1] != query.shape[1]:
        raise ValueError(
            f"attnkit attention: expected s_aux of shape (H,) = ({query.shape[1]},), got "
            f"{tuple(s_aux.shape) if isinstance(s_aux, Tensor) else type(s_aux).__name__}"
        )
    return s_aux.to(query.dtype)


def register(name: str = "attnkit", *, backend: str = "auto") -> str:
    """Register attnkit with transformers as ``attn_implementation=name``. Idempotent.

    Adds :func:`attention_forward` to ``transformers.AttentionInterface`` and attnkit's mask function to
    ``transformers.masking_utils.AttentionMaskInterface`` under ``name``; afterwards
    ``AutoModel.from_pretrained(path, attn_implementation=name)`` and ``model.set_attn_implementation(name)``
    work. Calling it again with the same arguments does nothing.

    Args:
        name: the implementation name. It must not contain ``"sdpa"``, ``"flash"``, ``"flex"`` (transformers
            would run those kernels' capability checks on it and refuse, e.g., Gemma 2), ``"eager"`` or
            ``"paged"``.
        backend: the attnkit backend every call uses; ``"auto"`` (default) picks per call, with the long-prompt
            routing of :func:`choose_backend`. Check a name with :func:`attnkit.backends.available`.

    Returns:
        ``name``.

    Raises:
        ValueError: a reserved or empty name, a name already registered with transformers by something else
            (or by attnkit with another backend), or an unknown backend.
        ImportError: transformers is not installed (``pip install 'attnkit[hf]'``).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:
        raise ImportError("attnkit.integrations.transformers needs transformers: pip install 'attnkit[hf]'") from None
    if not isinstance(name, str) or not name or any(s in name for s in _RESERVED_SUBSTRINGS):
        raise ValueError(
            f"register: name must be a non-empty string without {', '.join(map(repr, _RESERVED_SUBSTRINGS))} "
            f"(transformers gives those names special treatment), got {name!r}"
        )
    from attnkit.backends import available

    if backend != "auto" and backend not in available():
        raise ValueError(f"register: unknown backend {backend!r}; valid: 'auto', {', '.join(map(repr, available()))}")
    if name in _REGISTERED:
        if _REGISTERED[name] != backend:
            raise ValueError(
                f"register: {name!r} is already registered with backend {_REGISTERED[name]!r}, not {backend!r}; "
                f"pick another name"
            )
        return name
    if name in AttentionInterface._global_mapping or name in AttentionMaskInterface._global_mapping:
        raise ValueError(f"register: transformers already has an attention implementation named {name!r}")
    fn: Callable = attention_forward if backend == "auto" else functools.partial(attention_forward, backend=backend)
    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, hf_mask)
    _REGISTERED[name] = backend
    return name
