"""The machinery behind :func:`attnkit.explain.capture`: patches, hooks and record building.

Everything installed in ``__enter__`` is removed in ``__exit__``, also when the block raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.backends.math import math_forward
from attnkit.explain._detection import deformable_pre_hook, is_hf_deformable
from attnkit.explain._mha import ModuleHooks, _same
from attnkit.explain._recompute import (
    probability_tiles,
    select_index,
    select_weights,
    spec_from_sdpa,
    unfold_packed_gqa,
)
from attnkit.explain.records import AttentionRecord, TokenLayout, layout_from_dict
from attnkit.functional import observe
from attnkit.functional.spec import AttentionSpec

__all__ = ["HookPlan", "Interceptor"]

#: Keyword arguments whose presence marks a module call as cross-attention (transformers, torch, common code).
_CROSS_KWARGS = ("encoder_hidden_states", "key_value_states", "cross_attention_states", "memory", "context")
#: Module-path fragments of cross-attention modules (BERT "crossattention", T5 "EncDecAttention", BART
#: "encoder_attn", annotated-transformer "src_attn").
_CROSS_NAMES = ("cross", "encdec", "encoder_attn", "src_attn")
#: Keyword arguments whose presence marks a module call as running with a KV cache (self-attention over cached
#: keys: transformers' ``past_key_values``/``cache``, GPT-2's ``layer_past``, attnkit's ``kv_cache``).
_CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past", "kv_cache")
#: Per module type: whether ``forward`` takes ``(query, key, ...)`` first (then key is not query = cross).
_QUERY_KEY_FORWARD: dict[type, bool] = {}


#: torch's own modules that compute attention (or contain modules that do); every other ``torch.nn`` module
#: (Linear, LayerNorm, Conv, Dropout, activations) never calls it, so it needs no stack hooks:
#: hooks on every module cost about as much as a small model's forward.
_TORCH_ATTENTION_MODULES = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
    nn.TransformerEncoder,
    nn.TransformerDecoder,
    nn.Transformer,
)


def _never_attends(module: nn.Module) -> bool:
    """True for a module of ``torch.nn`` itself that never calls attention directly: its leaf modules, and its
    containers (``Sequential`` only calls its children, which get hooks of their own when they may attend;
    ``ModuleList``/``ModuleDict`` are never called), so the innermost module of an attention call is never one."""
    return not isinstance(module, _TORCH_ATTENTION_MODULES) and type(module).__module__.startswith("torch.nn.modules")


def _hook_kind(module: nn.Module) -> str | None:
    """The producer hooks a module gets besides the stack hooks: ``"mha"``, ``"enc"``, ``"patch"``, ``"deformable"``."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if isinstance(module, nn.TransformerEncoderLayer):
        return "enc"
    if "PatchEmbed" in type(module).__name__ and hasattr(module, "patch_size"):
        return "patch"
    return "deformable" if is_hf_deformable(module) else None


class HookPlan:
    """Where the hooks of a capture go on ``model``: module paths and hook kinds, from one walk over its modules.

    Built by every :class:`Interceptor` unless given one; a caller that captures the same model many times
    (a served model) builds it once. Valid while the model's submodules stay the same.

    With ``attending`` (the modules seen computing attention in an example run) only those modules, ``model``
    itself and ``publishers`` (modules whose ``token_layout`` the example's records used) get stack hooks; a
    capture then raises when attention is computed inside any other module.
    """

    def __init__(self, model: nn.Module, *, attending=None, publishers=()) -> None:
        self.model = model
        self.names = {m: n for n, m in reversed(list(model.named_modules()))}
        self.attending = None if attending is None else frozenset(attending)
        keep = None if attending is None else self.attending | set(publishers) | {model}
        hooks = ((m, _hook_kind(m)) for m in self.names)
        hooks = (  # torch's attention modules keep their stack hooks: their producer hooks name the innermost call
            (m, not _never_attends(m) if keep is None else (m in keep or kind in ("mha", "enc")), kind)
            for m, kind in hooks
        )
        self.modules = tuple(h for h in hooks if h[1] or h[2] is not None)  # (module, stack hooks, producer kind)


def _takes_query_key(module: nn.Module) -> bool:
    cls = type(module)
    known = _QUERY_KEY_FORWARD.get(cls)
    if known is None:
        try:
            names = list(inspect.signature(module.forward).parameters)[:2]
        except (TypeError, ValueError):
            names = []
        known = _QUERY_KEY_FORWARD[cls] = names == ["query", "key"]
    return known


def _published_layout(module: nn.Module) -> dict | None:
    """The ``token_layout`` a module published (attnkit.vision modules set it on the instance before attending),
    read without ``nn.Module.__getattr__``'s slow search for an attribute most modules lack."""
    published = module.__dict__.get("token_layout")
    if published is None and hasattr(type(module), "token_layout"):  # a property or class attribute
        published = getattr(module, "token_layout", None)
    return published


def _call_hint(module: nn.Module, args: tuple, kwargs: dict) -> bool | None:
    """Whether a module call is cross-attention, from what the call is; ``None`` when it does not say.

    Cross when a cross-attention keyword (``encoder_hidden_states``, ...) is given, or when a module taking
    ``(query, key, ...)`` gets a key that is not its query; self when it gets its query as key, or runs with a
    KV cache (``past_key_values``, ``cache``, ``kv_cache``, ...).
    """
    if kwargs and any(kwargs.get(k) is not None for k in _CROSS_KWARGS):
        return True
    if kwargs and any(kwargs.get(k) is not None for k in _CACHE_KWARGS):
        return False
    if _takes_query_key(module):
        q = args[0] if args else kwargs.get("query")
        k = args[1] if len(args) > 1 else kwargs.get("key")
        if isinstance(q, Tensor):
            return isinstance(k, Tensor) and not _same(q, k)
    return None


class Interceptor(ModuleHooks):
    """Installs the interception for one :func:`capture` block (see there for the options)."""

    def __init__(
        self,
        model,
        rec,
        *,
        layers=None,
        heads=None,
        query_rows=None,
        head_mean: bool = False,
        reducers=(),
        store: bool = False,
        layout=None,
        differentiable: bool = False,
        head_gates: Callable[[int, int], Tensor | None] | None = None,
        plan: HookPlan | None = None,
        math_kernel: bool = False,
    ):
        self.model, self.rec = model, rec
        self.layers = None if layers is None else frozenset(layers)
        self.heads, self.query_rows, self.head_mean = heads, query_rows, head_mean
        self.reducers, self.store, self.layout, self.differentiable = reducers, store, layout, differentiable
        self.head_gates = head_gates
        # attnkit's math path computes the calls, and its probabilities are recorded (no second computation)
        self.math_kernel = bool(differentiable or math_kernel)
        self.plan = HookPlan(model) if plan is None else plan
        self.names = self.plan.names
        self.stack: list[tuple[str, bool | None, nn.Module]] = []
        self.layer_ids: dict[str, int] = {}
        self.mha_entries: dict[int, int] = {}
        self.handled: AttentionSpec | None = None  # a call recorded by _intercept_call: its event is not recorded again
        self.mha_start: dict[int, int] = {}
        self.mha_wants: dict[int, tuple[bool, bool]] = {}
        self.enc_start: dict[int, int] = {}
        self.auto_layout: TokenLayout | None = None
        self.attending: set[nn.Module] = set()  # innermost modules of the calls seen (what a learned plan keeps)
        self.publishers: set[nn.Module] = set()  # modules whose published token layout a record used
        self.published: tuple[dict, TokenLayout | None] | None = None  # the last published layout, converted
        self.handles: list = []
        self.suspended = False

    @property
    def num_layers(self) -> int:
        return len(self.layer_ids)

    # ---------------------------------------------------------------- install / remove
    def __enter__(self) -> Interceptor:
        try:
            for module, stacked, kind in self.plan.modules:
                if stacked:  # the module stack names the innermost module of each call
                    self.handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(self._post, always_call=True))
                if kind == "mha":
                    self.handles.append(module.register_forward_pre_hook(self._mha_pre, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(self._mha_post, with_kwargs=True, prepend=True))
                elif kind == "enc":
                    self.handles.append(module.register_forward_pre_hook(self._enc_pre, with_kwargs=True))
                    self.handles.append(module.register_forward_hook(self._enc_post, with_kwargs=True, prepend=True))
                elif kind == "patch":
                    self.handles.append(module.register_forward_pre_hook(self._patch_pre))
                elif kind == "deformable":
                    self.handles.append(
                        module.register_forward_pre_hook(deformable_pre_hook(self._event), with_kwargs=True)
                    )
            # The one way to see foreign calls: replace torch's function for the block (see observe.in_backend).
            self.prev_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = self._sdpa
            self.contexts = ExitStack()
            self.contexts.enter_context(observe.observer(self._event))
            if self.math_kernel or self.head_gates is not None:
                self.contexts.enter_context(observe.interceptor(self._intercept_call))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()

    def _remove(self) -> None:
        contexts = getattr(self, "contexts", None)
        if contexts is not None:
            contexts.close()
            self.contexts = None
        for h in self.handles:
            h.remove()
        self.handles.clear()
        if getattr(self, "prev_sdpa", None) is not None:
            F.scaled_dot_product_attention = self.prev_sdpa
            self.prev_sdpa = None

    # ---------------------------------------------------------------- module stack
    def _pre(self, module, args, kwargs):
        self.stack.append((self.names[module], _call_hint(module, args, kwargs or {}), module))

    def _post(self, module, args, output):
        if self.stack:
            self.stack.pop()

    def _where(self, q_len: int | None = None, kv_len: int | None = None) -> tuple[str, bool]:
        """Innermost module path, and whether the call is cross-attention.

        From what the call is (:func:`_call_hint`: a cross-attention keyword, a key that is not the query, a KV
        cache), else from a module path naming cross-attention; only a module that says nothing about itself
        and attends ``Lq != Lk`` keys is taken as cross-attention (a hand-written decoder block).
        """
        name, cross, module = self.stack[-1]
        if module not in self.attending:
            if self.plan.attending is not None and module not in self.plan.attending:
                raise RuntimeError(
                    "capture: attention was computed outside the modules that computed it in the example the plan "
                    f"was learned from (capture_plan(model, example=...); innermost hooked module: "
                    f"{name or type(module).__name__!r}); build the plan without example= for a model whose "
                    "attention calls vary with the input"
                )
            self.attending.add(module)
        if cross is None:
            low = name.lower()
            cross = any(f in low for f in _CROSS_NAMES) or (q_len is not None and q_len != kv_len)
        return name, cross

    def _layer(self, name: str) -> int:
        return self.layer_ids.setdefault(name, len(self.layer_ids))

    def _patch_pre(self, module, args):
        x = args[0] if args else None
        if isinstance(x, Tensor) and x.dim() == 4:
            ph, pw = (module.patch_size,) * 2 if isinstance(module.patch_size, int) else module.patch_size[:2]
            self.auto_layout = TokenLayout(grid=(x.shape[-2] // ph, x.shape[-1] // pw), patch_size=(ph, pw))

    def _layout(self, reported: dict | None, num_tokens: int) -> TokenLayout | None:
        if self.layout is not None:
            return self.layout
        got = layout_from_dict(reported or {})
        if got is not None:
            return got
        for _, _, module in reversed(self.stack):  # attnkit.vision modules publish `token_layout` before attending
            published = _published_layout(module)
            if isinstance(published, dict) and published:
                self.publishers.add(module)
                if self.published is None or self.published[0] != published:  # one conversion per forward
                    self.published = (dict(published), layout_from_dict(published))
                return self.published[1]
        auto = self.auto_layout
        if auto is not None and auto.grid is not None:
            prefix = num_tokens - auto.grid[0] * auto.grid[1]
            if prefix >= 0:
                return TokenLayout(num_prefix_tokens=prefix, grid=auto.grid, patch_size=auto.patch_size)
        return None

    # ---------------------------------------------------------------- producers
    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if self.suspended or not self.stack or observe.in_backend():
            return self.prev_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        name, cross = self._where(query.shape[-2], key.shape[-2])
        layer = self._layer(name)
        wanted = self.layers is None or layer in self.layers
        unfolded = unfold_packed_gqa(self.stack[-1][2], query, key, attn_mask)
        gate = None
        if self.head_gates is not None:
            gate = self.head_gates(layer, query.shape[-3] if unfolded is None else unfolded[0].shape[-3])
        if wanted:
            q_seen, mask_seen = (query, attn_mask) if unfolded is None else unfolded
            spec = spec_from_sdpa(q_seen, key, value, mask_seen, dropout_p, is_causal, scale)
        if self.math_kernel and wanted:
            out, probs, _ = math_forward(
                replace(spec, dropout_p=float(dropout_p)), probs_leaf=self.differentiable, need_lse=False
            )
            self._record(name, layer, cross, "sdpa", spec=spec, weights=probs)
        else:
            out = self.prev_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
            if wanted:
                self._record(name, layer, cross, "sdpa", spec=spec)
            else:
                self._count()
        if gate is not None:
            shape = out.shape
            out = out.reshape(*shape[:-3], gate.numel(), -1, shape[-1]) * gate.view(-1, 1, 1).to(out.dtype)
            out = out.reshape(shape)
        return out.reshape(*query.shape[:-1], value.shape[-1])

    def _intercept_call(self, spec: AttentionSpec, run):
        """The interceptor of :func:`attnkit.functional.registry.dispatch` in math-kernel / head-gate modes."""
        if self.suspended or not self.stack:
            return run(spec)
        name, cross = self._where()
        layer = self._layer(name)
        gate = self.head_gates(layer, spec.num_heads) if self.head_gates is not None else None
        wanted = self.layers is None or layer in self.layers
        if self.differentiable or (self.math_kernel and wanted):
            out, probs, lse = math_forward(spec, probs_leaf=self.differentiable, need_lse=spec.return_lse)
            if wanted:  # recorded now, with the probabilities the output is computed from
                self._record(name, layer, cross, "attnkit", spec=spec, weights=probs)
                self.handled = spec
            weights = probs.to(spec.query.dtype) if spec.return_weights else None
            lse = lse if spec.return_lse else None
        else:
            out, weights, lse = run(spec)
        if gate is not None:
            out = out * gate.view(-1, 1, 1).to(out.dtype)
        return out, weights, lse

    def _event(self, event: observe.AttentionEvent) -> None:
        if self.suspended or not self.stack:
            return
        if event.spec is not None and event.spec is self.handled:
            self.handled = None
            return
        name, cross = self._where()
        layer = self._layer(name)
        if self.layers is not None and layer not in self.layers:
            self._count()
            return
        if event.kind == "scaled_dot_product" and event.spec is not None:
            self._record(name, layer, cross, "attnkit", spec=event.spec, weights=event.weights, layout=event.layout)
        elif event.kind == "token" and event.weights is not None:
            self._record(name, layer, cross, "attnkit", weights=event.weights, layout=event.layout)
        elif event.weights is not None:
            self.rec.num_calls += 1
            w = event.weights.detach()
            self.rec.maps.append(
                AttentionRecord(
                    name=name,
                    layer=layer,
                    call=self.rec.num_calls - 1,
                    kind=event.kind,
                    source=event.source,
                    shape=tuple(w.shape),
                    weights=w if self.store else None,
                    layout=layout_from_dict(event.layout),
                )
            )

    # ---------------------------------------------------------------- records
    def _count(self) -> None:
        self.rec.num_calls += 1

    def _record(self, name, layer, cross, source, *, spec=None, weights=None, layout=None):
        self.rec.num_calls += 1
        full = weights if weights is None or weights.dim() == 4 else weights.reshape((-1, *weights.shape[-3:]))
        if spec is not None:
            b = 1
            for s in spec.batch_shape:
                b *= s
            shape = (b, spec.num_heads, spec.q_len, spec.kv_len)
        else:
            shape = tuple(full.shape)
        num_heads, lq = shape[1], shape[2]
        heads = select_index(self.heads, num_heads, "heads", name)
        rows = select_index(self.query_rows, lq, "query_rows", name)
        rec = AttentionRecord(
            name=name,
            layer=layer,
            call=self.rec.num_calls - 1,
            kind="cross" if cross else "self",
            source=source,
            shape=shape,
            heads=None if heads is None else tuple(heads.tolist()),
            query_rows=None if rows is None else tuple(rows.tolist()),
            head_mean=self.head_mean,
            layout=self._layout(layout, shape[-1]),
        )
        if self.differentiable and full is not None and weights.requires_grad:
            rec.weights = weights  # the tensor on the autograd path (a reshaped view would get no gradient)
            self.rec.maps.append(rec)
            return
        if not self.store and not self.reducers:
            self.rec.maps.append(rec)  # metadata only: nothing asks for the probabilities
            return
        whole = heads is None and rows is None and not (self.head_mean or self.reducers)
        if whole and full is not None and full.dtype in (torch.float32, torch.float64):
            rec.weights = full  # the whole map as computed, kept as it is
            self.rec.maps.append(rec)
            return
        with torch.no_grad():
            if full is not None:
                every_row = torch.arange(lq) if rows is None and self.reducers else None  # what reducers index by
                tiles = [(select_weights(full, heads, rows), rows if rows is not None else every_row)]
            else:
                tiles = probability_tiles(spec, heads=heads, rows=rows)
            for r in self.reducers:
                r.start(rec)
            parts = []
            for p, r_idx in tiles:
                for red in self.reducers:
                    red.add(p, r_idx)
                if self.store:
                    parts.append(p.mean(1, keepdim=True) if self.head_mean else p)
            for red in self.reducers:
                red.finish(rec)
        if self.store:
            if not parts:  # an empty call (no query row): an empty map of the recorded shape
                b, h = shape[0], 1 if self.head_mean else (num_heads if heads is None else len(heads))
                parts = [torch.zeros(b, h, 0 if rows is None else len(rows), shape[-1])]
            rec.weights = parts[0] if len(parts) == 1 else torch.cat(parts, 2)  # float32 (float64 kept)
        self.rec.maps.append(rec)
