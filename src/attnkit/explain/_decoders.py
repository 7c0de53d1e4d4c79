"""How :func:`attnkit.explain.generation.generate_attribution` drives a decoder-only model one step at a time.

An adapter gives three things: the token embedding (so the embeddings can be autograd leaves), an empty cache,
and a forward of new embeddings against the cache that returns next-token logits and the updated cache.
Adapters are tried in registration order; the first whose ``matches(model)`` is true serves the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

__all__ = ["DecoderAdapter", "adapter_for", "register_decoder_adapter"]


class DecoderAdapter:
    """Step a decoder-only model with a KV cache. Subclasses implement the four methods."""

    name = "decoder"

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @staticmethod
    def matches(model: nn.Module) -> bool:
        raise NotImplementedError

    def embed(self, input_ids: Tensor) -> Tensor:
        """``(B, L, E)`` input embeddings of ``input_ids`` ``(B, L)``."""
        return self.model.get_input_embeddings()(input_ids)

    def new_cache(self) -> Any:
        raise NotImplementedError

    def forward(self, embeds: Tensor, attention_mask: Tensor, position_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """``(logits (B, L, V), cache)`` for new positions ``embeds`` ``(B, L, E)``; ``attention_mask``
        ``(B, cached + L)`` (1 = real), ``position_ids`` ``(B, L)`` (real positions, left padding skipped)."""
        raise NotImplementedError


_ADAPTERS: dict[str, type[DecoderAdapter]] = {}


def register_decoder_adapter(name: str) -> Callable[[type[DecoderAdapter]], type[DecoderAdapter]]:
    """Class decorator adding an adapter under ``name``.

    Raises:
        ValueError: ``name`` registered twice.
    """

    def add(cls: type[DecoderAdapter]) -> type[DecoderAdapter]:
        if name in _ADAPTERS:
            raise ValueError(f"register_decoder_adapter: {name!r} is already registered")
        cls.name = name
        _ADAPTERS[name] = cls
        return cls

    return add


@register_decoder_adapter("attnkit")
class AttnkitDecoder(DecoderAdapter):
    """attnkit decoders such as :class:`attnkit.models.char_decoder.CharDecoder`: ``new_cache()`` and
    ``forward(inputs_embeds=, attention_mask=, cache=) -> logits``; positions come from the cache (RoPE)."""

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return callable(getattr(model, "new_cache", None)) and callable(getattr(model, "get_input_embeddings", None))

    def new_cache(self) -> Any:
        return self.model.new_cache()

    def forward(self, embeds, attention_mask, position_ids, cache):
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache), cache


@register_decoder_adapter("transformers")
class TransformersDecoder(DecoderAdapter):
    """Hugging Face ``*ForCausalLM`` models (``attn_implementation="attnkit"`` or ``"sdpa"``, which
    :func:`attnkit.explain.capture` observes): their own ``Cache``, explicit ``position_ids``."""

    @staticmethod
    def matches(model: nn.Module) -> bool:
        return hasattr(model, "config") and callable(getattr(model, "get_input_embeddings", None))

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        params = inspect.signature(model.forward).parameters
        # transformers 5.2x renamed the forward's ``past_key_values`` to ``cache``.
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self) -> Any:
        return None

    def forward(self, embeds, attention_mask, position_ids, cache):
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            **{self.cache_kwarg: cache},
        )
        logits = getattr(out, "logits", None)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"generate_attribution: {type(self.model).__name__} returned no logits; load the model with its "
                "language-model head (AutoModelForCausalLM)"
            )
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = getattr(out, "past_key_values", None)
        return logits, new_cache


def adapter_for(model: nn.Module) -> DecoderAdapter:
    """The first registered adapter that serves ``model``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, or no adapter serves it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"generate_attribution: expected model to be a torch.nn.Module, got {type(model).__name__}")
    for cls in _ADAPTERS.values():
        if cls.matches(model):
            return cls(model)
    raise TypeError(
        f"generate_attribution: cannot step {type(model).__name__}; expected a Hugging Face *ForCausalLM model or "
        "an attnkit decoder with new_cache() and get_input_embeddings() (registered adapters: "
        f"{', '.join(_ADAPTERS)})"
    )
