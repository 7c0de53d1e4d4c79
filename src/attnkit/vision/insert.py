"""Insert an attention block into an existing model, after the modules you name, without touching its weights.

The question "does attention help my model?" starts from a model that has none. :func:`insert_attention` returns a
copy of it with a block (squeeze-and-excitation, ECA, CBAM, non-local, or single-/multi-head self-attention) applied
to the output of every module that ``where`` matches, and an :class:`InsertionSummary` of what went where and what it
costs (parameters, multiply-accumulates).

How a block is attached: to an ``nn.Sequential`` matched by ``where`` it is appended as the next element (so it runs
after the container's last layer); to any other module it is added as a child named ``inserted_attention`` and run
by a forward hook on the module's output (the first element when the output is a tuple, e.g. an RNN's
``(output, h_n)``). The parameters and buffers of the original modules keep their ``state_dict`` keys, so the
original model's checkpoints load into the copy with ``strict=False`` (only the new block's keys are missing).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.nn.residual_self_attention import LAYOUTS, ResidualSelfAttention
from attnkit.vision.registry import create_attention

__all__ = ["INSERT_KINDS", "Insertion", "InsertionSummary", "insert_attention"]

#: The child name under which a block hangs on a (non-Sequential) module it follows.
CHILD_NAME = "inserted_attention"

Where = str | type | Sequence[str | type]


def _feature_map_block(kind: str) -> Callable[..., nn.Module]:
    def build(channels: int, layout: str, **kwargs: Any) -> nn.Module:
        return create_attention(kind, channels, **kwargs)

    return build


def _self_attention(channels: int, layout: str, **kwargs: Any) -> nn.Module:
    return ResidualSelfAttention(channels, layout=layout, **kwargs)


#: kind -> (layouts it accepts, ``factory(channels, layout, **kwargs)``). The feature-map blocks come from
#: :func:`attnkit.vision.create_attention`; ``"self_attention"`` is :class:`attnkit.nn.ResidualSelfAttention`
#: (``num_heads=1`` by default: single-head), on maps and on sequences.
INSERT_KINDS: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
    **{k: (("BCHW",), _feature_map_block(k)) for k in ("se", "eca", "cbam", "nonlocal")},
    "self_attention": (LAYOUTS, _self_attention),
}


@dataclass(frozen=True)
class Insertion:
    """One inserted block.

    Attributes:
        where: qualified name of the module the block follows (``""`` = the whole model).
        module_type: that module's class name.
        block: the block's class name (e.g. ``"SqueezeExcite"``).
        layout: the layout of the tensor the block reads (:data:`attnkit.nn.residual_self_attention.LAYOUTS`).
        channels: ``C`` of that tensor.
        params: trainable parameters of the block.
        macs: multiply-accumulates of the block on ``example_input``, or ``None`` without it.
        shape: the block's input shape on ``example_input``, or ``None`` without it.
    """

    where: str
    module_type: str
    block: str
    layout: str
    channels: int
    params: int
    macs: int | None = None
    shape: tuple[int, ...] | None = None


@dataclass(frozen=True)
class InsertionSummary:
    """What :func:`insert_attention` inserted, and the cost. ``str(summary)`` is a printable table.

    Attributes:
        kind: the block kind.
        insertions: one :class:`Insertion` per matched module, in module order.
        base_params: trainable parameters of the original model.
        base_macs: MACs of one forward of the original model on ``example_input`` (``None`` without it).
        macs: MACs of one forward of the new model on ``example_input`` (``None`` without it).
    """

    kind: str
    insertions: list[Insertion] = field(default_factory=list)
    base_params: int = 0
    base_macs: int | None = None
    macs: int | None = None

    @property
    def added_params(self) -> int:
        """Parameters added by all blocks."""
        return sum(i.params for i in self.insertions)

    @property
    def added_macs(self) -> int | None:
        """MACs added to one forward on ``example_input`` (``None`` without it)."""
        return None if self.macs is None or self.base_macs is None else self.macs - self.base_macs

    def __str__(self) -> str:
        rows = [("after module", "type", "block", "input", "params", "MACs")]
        for i in self.insertions:
            shape = "x".join(map(str, i.shape)) if i.shape else f"C={i.channels}"
            rows.append(
                (i.where or "(model)", i.module_type, i.block, f"{i.layout} {shape}", f"{i.params:,}", _count(i.macs))
            )
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        lines = [f"insert_attention({self.kind!r}): {len(self.insertions)} block(s)"]
        lines += ["  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        pct = 100 * self.added_params / self.base_params if self.base_params else float("nan")
        lines.append(f"  added parameters: {self.added_params:,} (+{pct:.2f}% of {self.base_params:,})")
        if self.added_macs is not None:
            pct = 100 * self.added_macs / self.base_macs if self.base_macs else float("nan")
            total = _count(self.base_macs)
            lines.append(f"  added MACs on example_input: {_count(self.added_macs)} (+{pct:.2f}% of {total})")
        return "\n".join(lines)


def _count(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


class _ApplyInserted:
    """Forward hook running the module's ``inserted_attention`` child on its output (picklable: no closure)."""

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        block = getattr(module, CHILD_NAME)
        if isinstance(output, tuple):  # e.g. an RNN's (output, h_n): attend over the states
            return (block(output[0]), *output[1:])
        if isinstance(output, Tensor):
            return block(output)
        raise TypeError(
            f"insert_attention: the output of {type(module).__name__} is a {type(output).__name__}; a block can "
            f"follow a module returning a tensor or a tuple starting with one (PackedSequence is not supported)"
        )


def _patterns(where: Where) -> list[str | type]:
    items = [where] if isinstance(where, str | type) else list(where)
    bad = [w for w in items if not isinstance(w, str | type)]
    if not items or bad:
        raise TypeError(
            f"insert_attention: expected where to be a module name pattern (fnmatch wildcards), a module type, or "
            f"a sequence of them, got {where!r}"
        )
    return items


def _match(model: nn.Module, where: Where) -> list[str]:
    patterns = _patterns(where)
    names = []
    for name, module in model.named_modules():
        if any(
            isinstance(module, p) if isinstance(p, type) else (name and fnmatch.fnmatchcase(name, p)) for p in patterns
        ):
            names.append(name)
    if not names:
        all_names = [n for n, _ in model.named_modules() if n]
        shown = ", ".join(all_names[:12]) + (f", ... ({len(all_names)} modules)" if len(all_names) > 12 else "")
        raise ValueError(
            f"insert_attention: where={where!r} matched no module of {type(model).__name__}; its modules are: "
            f"{shown or '(none)'}. Use names with fnmatch wildcards (e.g. 'layer*.conv2') or module types "
            f"(e.g. nn.Conv2d)"
        )
    unusable = [n for n in names if isinstance(model.get_submodule(n), nn.ModuleList | nn.ModuleDict)]
    if unusable:
        raise ValueError(
            f"insert_attention: where={where!r} matched {', '.join(unusable)}, a ModuleList/ModuleDict that is never "
            f"called itself; match its elements instead (e.g. '{unusable[0]}.*')"
        )
    return names


def _static_layout(module: nn.Module) -> tuple[str, int] | None:
    """``(layout, channels)`` of a module's output from its type and attributes, when they tell."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        return "BCHW", module.out_channels
    if isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
        return "BCL", module.out_channels
    if isinstance(module, nn.BatchNorm2d | nn.InstanceNorm2d):
        return "BCHW", module.num_features
    if isinstance(module, nn.RNNBase):
        width = getattr(module, "proj_size", 0) or module.hidden_size
        return ("BLC" if module.batch_first else "LBC"), width * (2 if module.bidirectional else 1)
    return None


def _trace_shapes(model: nn.Module, names: list[str], example: tuple[Tensor, ...]) -> dict[str, torch.Size]:
    """The output shape (first tensor of a tuple) of every named module when ``model(*example)`` runs."""
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            first = output[0] if isinstance(output, tuple | list) and output else output
            if isinstance(first, Tensor):
                shapes.setdefault(name, first.shape)

        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n in names if n not in shapes]
    if missing:
        raise ValueError(
            f"insert_attention: {', '.join(missing)} did not return a tensor when the model ran on example_input "
            f"(not called, or returned something else); choose modules whose output the block can read"
        )
    return shapes


def _layout_of(name: str, module: nn.Module, shape: torch.Size | None, layout: str | None) -> tuple[str, int]:
    static = _static_layout(module)
    if shape is None:
        if layout is None and static is None:
            raise ValueError(
                f"insert_attention: cannot tell the output channels of {name or '(model)'} "
                f"({type(module).__name__}) from its attributes; pass example_input= (one batch of model inputs)"
            )
        if static is None:
            raise ValueError(
                f"insert_attention: layout={layout!r} given but the channels of {name} ({type(module).__name__}) "
                f"are unknown; pass example_input="
            )
        return layout or static[0], static[1]
    if layout is None:
        if len(shape) == 4:
            layout = "BCHW"
        elif len(shape) == 3 and static is not None:
            layout = static[0]
        else:
            raise ValueError(
                f"insert_attention: {name or '(model)'} ({type(module).__name__}) returns shape {tuple(shape)}; "
                f"pass layout= one of {', '.join(LAYOUTS)} to say which dimension holds the channels"
            )
    if len(shape) != (4 if layout == "BCHW" else 3):
        raise ValueError(
            f"insert_attention: {name or '(model)'} returns shape {tuple(shape)}, which is not layout {layout}"
        )
    return layout, shape[1 if layout in ("BCHW", "BCL") else 2]


def _eval_macs(module: nn.Module, args: tuple[Tensor, ...]) -> int:
    """MACs of ``module(*args)`` in eval mode (BatchNorm statistics untouched); the mode is restored."""
    from attnkit.measure import count_macs

    was_training = module.training
    try:
        return count_macs(lambda: module.eval()(*args))
    finally:
        module.train(was_training)


def _attach(model: nn.Module, name: str, module: nn.Module, block: nn.Module) -> None:
    if isinstance(module, nn.Sequential):
        module.append(block)
        return
    if hasattr(module, CHILD_NAME):
        raise ValueError(f"insert_attention: {name or '(model)'} already has an attribute {CHILD_NAME!r}")
    module.add_module(CHILD_NAME, block)
    module.register_forward_hook(_ApplyInserted())


def insert_attention(
    model: nn.Module,
    kind: str,
    *,
    where: Where,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    layout: str | None = None,
    verbose: bool = False,
    **kwargs: Any,
) -> tuple[nn.Module, InsertionSummary]:
    """A copy of ``model`` with an attention block after every module that ``where`` matches.

    Args:
        model: the model without attention; it is not modified.
        kind: a key of :data:`INSERT_KINDS`: ``"se"``, ``"eca"``, ``"cbam"``, ``"nonlocal"`` (feature maps
            ``(B, C, Hi, Wi)`` only) or ``"self_attention"`` (maps or sequences; ``num_heads=1`` by default,
            i.e. single-head attention; pass ``num_heads=4`` for multi-head).
        where: which modules the blocks follow: qualified module names (``model.named_modules()``) with
            :mod:`fnmatch` wildcards (``"layer*.conv2"``, ``"features.3"``), module types (``nn.Conv2d``,
            ``nn.GRU``), or a sequence mixing both. Every match gets its own block.
        example_input: one batch of model inputs (a tensor, or a tuple of positional arguments). With it, each
            matched module's output shape is traced (so any module type can be matched) and the summary counts
            MACs; without it, channels are read from the module's attributes (Conv1d/2d, BatchNorm2d,
            RNN/GRU/LSTM). Pass a batch of one for per-example MACs.
        layout: the layout of the matched modules' outputs (:data:`~attnkit.nn.residual_self_attention.LAYOUTS`);
            default: inferred (4-D -> ``"BCHW"``; an RNN's batch_first; a Conv1d's ``"BCL"``).
        verbose: print the summary.
        **kwargs: passed to the block's constructor (e.g. ``reduction=8``, ``num_heads=4``).

    Returns:
        ``(new_model, summary)``: a deep copy with the blocks inserted (same device and dtype as the matched
        modules), and an :class:`InsertionSummary`.

    Raises:
        ValueError: an unknown ``kind`` (valid ones listed); ``where`` matching no module (the model's module
            names are listed) or a ModuleList/ModuleDict; a block kind that cannot read the matched output
            (e.g. SE after an RNN); an output whose channels cannot be determined; the block's own errors.
        TypeError: ``where`` of the wrong type.

    References:
        Hu et al. 2018 (SE), Wang et al. 2020 (ECA), Woo et al. 2018 (CBAM), Wang et al. 2018 (non-local),
        Zhang et al. 2019 (SAGAN, the zero-initialised residual self-attention).

    Example:
        >>> cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1))
        >>> new, summary = insert_attention(cnn, "se", where="2", example_input=torch.zeros(1, 3, 8, 8), reduction=4)
        >>> [i.where for i in summary.insertions], summary.added_params
        (['2'], 552)
    """
    if kind not in INSERT_KINDS:
        raise ValueError(f"insert_attention: unknown kind {kind!r}; valid: {', '.join(map(repr, INSERT_KINDS))}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"insert_attention: unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    from attnkit.measure import count_parameters

    names = _match(model, where)
    example = None
    if example_input is not None:
        example = tuple(example_input) if isinstance(example_input, tuple | list) else (example_input,)
    shapes = _trace_shapes(model, names, example) if example is not None else {}
    accepted, factory = INSERT_KINDS[kind]
    new = copy.deepcopy(model)
    insertions = []
    for name in names:
        module = new.get_submodule(name)
        block_layout, channels = _layout_of(name, module, shapes.get(name), layout)
        if block_layout not in accepted:
            raise ValueError(
                f"insert_attention: kind {kind!r} needs a feature map (B, C, Hi, Wi), but {name or '(model)'} "
                f"({type(module).__name__}) gives layout {block_layout}; use kind='self_attention' for sequences"
            )
        reference = next(iter(module.parameters()), None)
        if reference is None:
            reference = next(iter(new.parameters()), None)
        block = factory(channels, block_layout, **kwargs)
        if reference is not None:
            block = block.to(device=reference.device, dtype=reference.dtype)
        block.train(module.training)
        macs, shape = None, None
        if name in shapes:
            shape = tuple(shapes[name])
            dtype = reference.dtype if reference is not None else torch.get_default_dtype()
            device = reference.device if reference is not None else None
            macs = _eval_macs(block, (torch.zeros(shape, dtype=dtype, device=device),))
        insertions.append(
            Insertion(name, type(module).__name__, type(block).__name__, block_layout, channels,
                      count_parameters(block), macs, shape)
        )  # fmt: skip
        _attach(new, name, module, block)
    base_macs = macs_after = None
    if example is not None:
        base_macs, macs_after = _eval_macs(model, example), _eval_macs(new, example)
    summary = InsertionSummary(kind, insertions, count_parameters(model), base_macs, macs_after)
    if verbose:
        print(summary)
    return new, summary
