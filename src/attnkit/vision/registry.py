"""Feature-map attention by name, so a CNN can take its attention block as a parameter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from attnkit.vision.cbam import CBAM
from attnkit.vision.eca import ECA
from attnkit.vision.mhsa import MHSA2d
from attnkit.vision.non_local import NonLocal2d
from attnkit.vision.squeeze_excite import SqueezeExcite

__all__ = ["available_attention", "create_attention", "register_attention"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding ``factory(channels, **kw) -> nn.Module`` under ``name``.

    The module must map ``(B, C, Hi, Wi)`` to the same shape.

    Raises:
        ValueError: ``name`` is already registered or empty.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_attention: expected a non-empty name, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"register_attention: {name!r} is already registered (by {_REGISTRY[name].__qualname__})")

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY[name] = factory
        return factory

    return add


def available_attention() -> list[str]:
    """The registered names, sorted (``None`` is also accepted by :func:`create_attention`)."""
    return sorted(_REGISTRY)


def create_attention(name: str | None, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention block ``name`` for ``channels``-channel feature maps.

    Names: ``"se"`` (:class:`SqueezeExcite`), ``"eca"`` (:class:`ECA`), ``"cbam"`` (:class:`CBAM`),
    ``"nonlocal"`` (:class:`NonLocal2d`), ``"mhsa"`` (:class:`MHSA2d`), plus anything added with
    :func:`register_attention`; ``None`` gives ``nn.Identity()`` (no attention).

    Args:
        name: registry name or ``None``.
        channels: ``C`` of the ``(B, C, Hi, Wi)`` input.
        **kwargs: passed to the block's constructor (e.g. ``reduction=8``, ``device``, ``dtype``).

    Returns:
        an ``nn.Module`` mapping ``(B, C, Hi, Wi)`` to the same shape.

    Raises:
        ValueError: an unknown name (the message lists the valid ones); the block's own errors.

    Example:
        >>> create_attention("eca", 256).kernel_size
        5
    """
    if name is None:
        return nn.Identity()
    if name not in _REGISTRY:
        valid = ", ".join(repr(n) for n in available_attention())
        raise ValueError(f"create_attention: unknown attention {name!r}; valid names: {valid}, or None")
    return _REGISTRY[name](channels, **kwargs)


@register_attention("se")
def _se(channels: int, **kwargs: Any) -> nn.Module:
    return SqueezeExcite(channels, **kwargs)


@register_attention("eca")
def _eca(channels: int, **kwargs: Any) -> nn.Module:
    return ECA(channels, **kwargs)


@register_attention("cbam")
def _cbam(channels: int, **kwargs: Any) -> nn.Module:
    return CBAM(channels, **kwargs)


@register_attention("nonlocal")
def _nonlocal(channels: int, **kwargs: Any) -> nn.Module:
    return NonLocal2d(channels, **kwargs)


@register_attention("mhsa")
def _mhsa(channels: int, **kwargs: Any) -> nn.Module:
    return MHSA2d(channels, **kwargs)
