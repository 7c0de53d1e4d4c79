"""attnkit: attention mechanisms for PyTorch, one tested API, fast backends, and tools to see where models attend."""

from attnkit import backends, masks
from attnkit.functional import AttentionOutput, attention

__version__ = "0.1.0"

__all__ = ["AttentionOutput", "__version__", "attention", "backends", "masks"]
