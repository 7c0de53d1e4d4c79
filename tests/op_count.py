"""Counting the aten operations a piece of code dispatches (views included), for tests of operation counts."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    """How many aten operations ``fn()`` dispatches."""
    with _Count() as c:
        fn()
    return c.n
