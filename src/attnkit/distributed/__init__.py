"""Context-parallel attention over ``torch.distributed``: one sequence sharded across processes or machines.

``ring_attention`` computes exact attention (every option of :func:`attnkit.attention` that makes sense for a
sharded sequence, in global positions) with each rank holding a slice; ``shard``/``unshard`` cut and
reassemble sequences in the ``"contiguous"`` or load-balanced ``"zigzag"`` layout; ``merge_attention`` (the
core's :func:`attnkit.functional.merge.merge_attention`, re-exported) merges partial attentions exactly through
their log-sum-exp in float32, with autograd (also what split-KV decoding needs). Launch the processes
with ``torchrun``; gloo serves CPUs, nccl GPUs.
"""

from attnkit.distributed.layout import LAYOUTS, global_positions, shard, unshard
from attnkit.distributed.ring import ring_attention
from attnkit.functional.merge import merge_attention

__all__ = ["LAYOUTS", "global_positions", "merge_attention", "ring_attention", "shard", "unshard"]
