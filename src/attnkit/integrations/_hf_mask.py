"""The mask half of the Hugging Face integration: what HF's mask builders hand to attnkit's attention function.

transformers builds one mask per forward pass (per layer type) through its ``AttentionMaskInterface``: it calls
the registered function with the batch size, query/key lengths, the cache offsets, a ``mask_function`` describing
the pattern (``mask_function(b, h, q_idx, kv_idx) -> bool``, FlexAttention's signature) and the 2-D padding mask.
HF's own ``sdpa`` builder returns a dense ``(B, 1, Lq, Lk)`` boolean tensor whenever there is padding.
:func:`hf_mask` instead returns an :class:`HFMask`: the pattern, recognised as causal / bidirectional with an
optional sliding window, plus the ``(B, Lk)`` padding row, which attnkit applies as ``is_causal``, ``window_size``
and a ``(B, 1, 1, Lk)`` ``attn_mask`` — nothing ``Lq x Lk`` is built. Patterns it does not recognise (packed
sequences, chunked attention, image-token overlays, custom ``or``/``and`` functions) get HF's own dense boolean
mask, so the result is exact in every case.

Positions: HF numbers query row ``i`` as position ``q_offset + i`` and key column ``j`` as ``kv_offset + j``.
attnkit's causal/window masks are bottom-right aligned (query ``i`` sits at key ``i + Lk - Lq``); the two agree
when ``q_offset - kv_offset == Lk - Lq``. In a static cache the keys include empty slots after the last written
one (``Lk`` = the cache size), which a causal query never sees: :meth:`HFMask.visible_keys` says how many keys to
keep so that the alignments agree (HF's own sdpa path relies on torch's top-left ``is_causal`` instead).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["HFMask", "hf_mask", "recognise_pattern"]


@dataclass(frozen=True, eq=False)
class HFMask:
    """The attention mask of one HF forward pass for one layer type, in attnkit's terms.

    Attributes:
        q_length: ``Lq`` the mask was built for.
        kv_length: ``Lk`` the mask was built for (static caches: the cache size).
        offset: ``q_offset - kv_offset``: the position of query row 0 minus that of key column 0.
        is_causal: key position ``<=`` query position.
        window: attnkit ``window_size`` ``(left, right)`` in positions, or ``None``. HF's causal
            ``sliding_window = w`` (the window *including* the token itself) is ``(w - 1, 0)``; its bidirectional
            window ``|q - k| <= w`` is ``(w, w)``.
        padding: ``(B, Lk)`` bool, True = a real key; ``None`` when every key is real.
        dense: ``(B, 1, Lq, Lk)`` bool (True = may attend) when the pattern was not recognised; then it is the
            whole mask and the other fields are not used.
    """

    q_length: int
    kv_length: int
    offset: int = 0
    is_causal: bool = False
    window: tuple[int, int] | None = None
    padding: Tensor | None = None
    dense: Tensor | None = None

    # Tensor-like facts, for HF code that inspects a mask before handing it on.
    @property
    def shape(self) -> tuple[int, ...]:
        if self.dense is not None:
            return tuple(self.dense.shape)
        batch = 1 if self.padding is None else self.padding.shape[0]
        return (batch, 1, self.q_length, self.kv_length)

    @property
    def ndim(self) -> int:
        return 4

    @property
    def dtype(self) -> torch.dtype:
        return torch.bool

    def visible_keys(self) -> int:
        """How many leading keys any query may see: ``Lk``, or fewer when a causal mask ends before the last key
        (a static cache's empty slots). Keeping only these makes bottom-right alignment equal HF's positions."""
        if self.dense is not None or not self.is_causal:
            return self.kv_length
        return self.q_length + self.offset


def _code(fn) -> object:
    return getattr(fn, "__code__", None)


def _closure(fn) -> dict:
    try:
        return inspect.getclosurevars(fn).nonlocals
    except TypeError:
        return {}


def recognise_pattern(mask_function) -> tuple[bool, tuple[int, int] | None] | None:
    """``(is_causal, window)`` for HF's standard mask functions, ``None`` for anything else.

    Recognised (by code object, so only HF's own functions match): ``causal_mask_function``,
    ``bidirectional_mask_function``, ``sliding_window_causal_mask_function(w)`` and
    ``sliding_window_bidirectional_mask_function(w)`` (``and_masks`` of the overlay and the base).
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return True, None
    if mask_function is mu.bidirectional_mask_function:
        return False, None
    if _code(mask_function) is not _code(mu.and_masks(mu.causal_mask_function)):
        return None
    parts = _closure(mask_function).get("mask_functions", ())
    if len(parts) != 2:
        return None
    overlay, base = parts
    width = _closure(overlay).get("sliding_window")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        return None
    if base is mu.causal_mask_function and _code(overlay) is _code(mu.sliding_window_overlay(1)):
        return True, (width - 1, 0)
    if base is mu.bidirectional_mask_function and _code(overlay) is _code(mu.sliding_window_bidirectional_overlay(1)):
        return False, (width, width)
    return None


def _as_int(x) -> int:
    return int(x.item()) if isinstance(x, Tensor) else int(x)


def hf_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int | Tensor = 0,
    mask_function=None,
    attention_mask: Tensor | HFMask | None = None,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> HFMask:
    """transformers ``AttentionMaskInterface`` function: the mask of one forward pass as an :class:`HFMask`.

    Args:
        batch_size: ``B``.
        q_length: ``Lq``.
        kv_length: ``Lk`` of the keys the attention will receive.
        q_offset: position of the first query (cache length); an int or a 0-d tensor (static caches).
        kv_offset: position of the first key.
        mask_function: HF's pattern, ``mask_function(b, h, q_idx, kv_idx) -> bool`` on positions; default causal.
        attention_mask: ``(B, S)`` padding mask (True/1 = real token), ``S <= kv_offset + Lk``; or an
            :class:`HFMask` already built for this step (``generate`` with a static cache builds masks ahead of
            the forward pass), returned unchanged.
        use_vmap: HF's flag that ``mask_function`` is not index-broadcastable; passed on for the dense fallback.
        device: where to build tensors.
        **kwargs: HF's other mask-builder arguments (``dtype``, ``config``, ``local_size``, skip flags): unused.

    Returns:
        the :class:`HFMask`.
    """
    if isinstance(attention_mask, HFMask):
        return attention_mask
    from transformers import masking_utils as mu

    mask_function = mu.causal_mask_function if mask_function is None else mask_function
    q_off, kv_off = _as_int(q_offset), _as_int(kv_offset)
    offset = q_off - kv_off
    padding = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask.to(device=device, dtype=torch.bool), kv_length, kv_off)
        padding = padding[:, kv_off : kv_off + kv_length]
        if bool(padding.all()):
            padding = None
    pattern = recognise_pattern(mask_function)
    if pattern is not None:
        is_causal, window = pattern
        # bottom-right alignment must be reachable by keeping the first `visible` keys
        aligned = (q_length + offset <= kv_length) if is_causal else (window is None or offset == kv_length - q_length)
        if aligned and q_length + offset >= 1:
            return HFMask(q_length, kv_length, offset, is_causal, window, padding)
    dense = mu.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_off,
        kv_offset=kv_off,
        mask_function=mask_function,
        attention_mask=attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        use_vmap=use_vmap,
        device=device,
    )
    return HFMask(q_length, kv_length, offset, dense=dense.expand(batch_size, 1, q_length, kv_length))
