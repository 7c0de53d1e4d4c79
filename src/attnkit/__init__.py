"""attnkit: attention mechanisms for PyTorch, one tested API, fast backends, and tools to see where models attend.

``attnkit.attention`` is the functional core; ``attnkit.backends`` its registry; ``attnkit.masks`` mask helpers.
Submodules ``nn``, ``models``, ``vision``, ``explain``, ``sparse``, ``datasets``, ``text``, ``ablation`` and
``distributed`` are imported on first use.
"""

import importlib

from attnkit import backends, masks
from attnkit.functional import AttentionOutput, attention

__version__ = "0.1.0"

_LAZY = ("nn", "models", "vision", "explain", "sparse", "datasets", "text", "ablation", "distributed")

__all__ = ["AttentionOutput", "__version__", "attention", "backends", "masks", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"attnkit.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'attnkit' has no attribute {name!r}")
