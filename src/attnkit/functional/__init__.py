"""Pure functions: attention, masks and input validation. Imports nothing above it in attnkit."""

from attnkit.functional.attention import attention
from attnkit.functional.spec import AttentionOutput, AttentionSpec, make_spec

__all__ = ["AttentionOutput", "AttentionSpec", "attention", "make_spec"]
