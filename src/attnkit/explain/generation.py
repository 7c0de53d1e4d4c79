"""Generation attribution: for each token a decoder-only model generates, how much each prompt and earlier token
contributed, computed while generating with the KV cache.

Each step feeds only the new token (the prompt in one prefill call), as ``generate()`` does; the methods read what
that step adds and keep what earlier steps computed:

* ``"raw"``: the new query's attention row in one layer (default the last), mean of heads;
* ``"rollout"`` (Abnar & Zuidema 2020): the rollout rows of every layer are kept, and the new position's row
  of layer ``l`` is ``Â_l[p] · R_{l-1}`` over the kept rows, so rollout costs one row product per layer and step;
* ``"grad_input"`` (gradient x input, Shrikumar et al. 2016; Denil et al. 2014): the input embeddings of every
  step are autograd leaves and the cached keys/values stay on the graph, so one backward pass per step from the
  explained logit reaches every earlier token through the cache;
* ``"attnlrp"`` / ``"cp-lrp"`` (Achtibat et al. 2024; Ali et al. 2022): gradient x input under the LRP rules of
  :func:`attnkit.explain.lrp`, installed for the whole generation, with the published rules (``lrp``'s
  ``conserve=False``: biases and the softmax rule absorb their share); computed in a call of their own;
* ``"relevance"`` (Chefer et al. 2021): the attention maps of every step stay on the graph (captured with
  ``differentiable=True``); each step's backward gives the gradients of all rows so far, and
  :func:`attnkit.explain.relevance.propagate_relevance` is run on the rows assembled into full maps.

A row equals what the same method gives from one forward over the whole sequence (the tests check it in float64).

Cost (``benchmarks/RESULTS.md``, the shipped character decoder, 64 generated tokens): rollout with the cache is
3.8x faster than re-running the sequence for every token; the gradient methods save the forward passes, but each
step's backward walks the graph of every cached step (many small operations), 2.8x slower than re-running on a CPU.

Contrastive explanations (Yin & Neubig 2022, "Interpreting Language Models with Contrastive Explanations",
EMNLP): with ``foil``, the explained score is ``logit[target] - logit[foil]``; for gradient x input this is
exactly the difference of the two logits' attributions. Attention-only methods (``raw``, ``rollout``) do not
depend on the explained token and refuse a foil.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnkit.explain._decoders import adapter_for
from attnkit.explain.capture import capture
from attnkit.explain.relevance import propagate_relevance
from attnkit.explain.rollout import augment, fuse_heads

__all__ = ["GENERATION_METHODS", "GenerationAttribution", "generate_attribution"]

#: Methods of :func:`generate_attribution`.
GENERATION_METHODS = ("raw", "rollout", "grad_input", "relevance", "attnlrp", "cp-lrp")
_LRP = frozenset({"attnlrp", "cp-lrp"})
_GRADIENT = frozenset({"grad_input", "relevance"}) | _LRP
_MAPS = frozenset({"raw", "rollout", "relevance"})


@dataclass
class GenerationAttribution:
    """What :func:`generate_attribution` returns. ``B`` prompts, ``P`` prompt length (with left padding), ``N``
    generated tokens, ``S = P + N`` positions of the final sequences.

    Attributes:
        scores: ``{method: (B, N, S)}``: row ``t`` attributes generated token ``t`` (at position ``P + t``) to
            the positions ``< P + t`` it was predicted from; later positions and padding are 0.
        sequences: ``(B, S)`` long: the prompts (left-padded) followed by the generated tokens.
        attention_mask: ``(B, S)`` long, 1 for real tokens.
        prompt_length: ``P``.
        explained: ``(B, N)`` the explained scores: ``logit[target]``, or ``logit[target] - logit[foil]``.
        foils: ``(B, N)`` foil token ids, or ``None``.
    """

    scores: dict[str, Tensor]
    sequences: Tensor
    attention_mask: Tensor
    prompt_length: int
    explained: Tensor
    foils: Tensor | None = None

    def __getitem__(self, method: str) -> Tensor:
        if method not in self.scores:
            raise KeyError(f"GenerationAttribution: no {method!r} scores; computed: {', '.join(self.scores)}")
        return self.scores[method]

    @property
    def generated(self) -> Tensor:
        """``(B, N)`` the generated (explained) token ids."""
        return self.sequences[:, self.prompt_length :]

    def matrix(self, method: str, index: int = 0) -> tuple[Tensor, Tensor]:
        """The token-by-token matrix of prompt ``index`` without its padding.

        Returns:
            ``(scores (N, S'), ids (S',))``: rows are the generated tokens, columns the real positions of the
            sequence (prompt and generated tokens), ``S'`` of them.
        """
        real = self.attention_mask[index].bool()
        return self[method][index][:, real], self.sequences[index][real]

    def token_matrix(self, method: str, index: int, tokens: Sequence[str], *, caption: str | None = None):
        """The :class:`attnkit.explain.token_matrix.TokenMatrix` of prompt ``index`` for the report: rows the
        generated tokens, columns the real tokens they can draw on (all but the last generated one).

        Args:
            method: a computed method.
            index: the prompt.
            tokens: ``S`` labels of ``sequences[index]`` (padding included; it is dropped).
            caption: shown above the table.

        Raises:
            KeyError: a method not computed; ValueError: ``len(tokens) != S``.
        """
        from attnkit.explain.token_matrix import TokenMatrix

        if len(tokens) != self.sequences.shape[1]:
            raise ValueError(f"token_matrix: expected {self.sequences.shape[1]} token labels, got {len(tokens)}")
        scores, _ = self.matrix(method, index)
        real = self.attention_mask[index].bool().tolist()
        columns = [t for t, keep in zip(tokens, real) if keep]
        rows = list(tokens[self.prompt_length :])
        # the last generated token is never a source: no column for it
        return TokenMatrix(scores[:, :-1], rows, columns[:-1], caption=caption)


def _check_prompt(input_ids, attention_mask) -> tuple[Tensor, Tensor]:
    if not isinstance(input_ids, Tensor) or input_ids.ndim != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"generate_attribution: expected input_ids (B, P) integer ids, got {input_ids!r:.80}")
    if input_ids.shape[1] < 1:
        raise ValueError("generate_attribution: expected input_ids with at least one position, got P=0")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    if not isinstance(mask, Tensor) or mask.shape != input_ids.shape:
        raise ValueError(
            f"generate_attribution: expected attention_mask of shape {tuple(input_ids.shape)} (like input_ids), "
            f"got {getattr(mask, 'shape', mask)!r:.80}"
        )
    mask = mask.long()
    if bool(((mask != 0) & (mask != 1)).any()):
        raise ValueError("generate_attribution: attention_mask must hold 0 (padding) and 1 (real tokens) only")
    if bool((mask[:, 1:] < mask[:, :-1]).any()) or not bool(mask[:, -1].all()):
        raise ValueError(
            "generate_attribution: expected left padding (each attention_mask row 0...0 1...1, ending in a real "
            "token); pad prompts on the left, e.g. tokenizer.padding_side = 'left'"
        )
    return input_ids, mask


def _check_tokens(value, name: str, batch: int, steps: int, *, allow_short: bool) -> Tensor | None:
    """``None``, or a ``(B, n)`` long tensor from an int, a ``(B,)`` or a ``(B, n)`` tensor."""
    if value is None:
        return None
    t = torch.as_tensor(value)
    if t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"generate_attribution: expected {name} to hold token ids, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(batch, steps)
    elif t.ndim == 1 and t.shape[0] == batch:
        t = t[:, None].expand(batch, steps)
    ok_len = t.ndim == 2 and (t.shape[1] <= steps if allow_short else t.shape[1] == steps)
    if not ok_len or t.shape[0] != batch:
        want = f"(B, n <= {steps})" if allow_short else f"an int, (B,) or (B, N) = ({batch}, {steps})"
        raise ValueError(f"generate_attribution: expected {name} {want}, got shape {tuple(t.shape)}")
    return t.long()


def _check_methods(methods) -> tuple[str, ...]:
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    bad = [m for m in methods if m not in GENERATION_METHODS]
    if not methods or bad:
        raise ValueError(
            f"generate_attribution: unknown methods {bad} (or none); valid: {', '.join(GENERATION_METHODS)}"
        )
    return tuple(dict.fromkeys(methods))


def _lrp_rules(model: nn.Module, rule: str, stack: ExitStack) -> None:
    """Install :func:`attnkit.explain.lrp`'s rules (published form) on ``model`` until ``stack`` closes."""
    from attnkit.explain.lrp import _attention_rule, _install
    from attnkit.functional import observe

    _install(model, stack, rule)
    stack.enter_context(observe.interceptor(_attention_rule(rule, None, [])))


def _keys_at_positions(a: Tensor, positions: int) -> Tensor:
    """``a`` ``(..., Lk)`` over the last ``Lk`` of ``positions`` keys (a sliding-window cache keeps only the
    most recent ones) as ``(..., positions)``, zeros in front."""
    return F.pad(a, (positions - a.shape[-1], 0))


class _Rollout:
    """The rollout rows ``R_l`` of every layer over the positions seen so far (Abnar & Zuidema 2020, Sec. 3)."""

    def __init__(self) -> None:
        self.rows: list[Tensor] = []  # per layer (B, S, S)

    def extend(self, maps: list[Tensor]) -> Tensor:
        """Add the rows of new positions from this step's maps ``[(B, H, L, S)]``; return the last row ``(B, S)``."""
        new: list[Tensor] = []
        for i, a in enumerate(maps):
            length, total = a.shape[-2], a.shape[-1]
            a_hat = augment(fuse_heads(a), torch.arange(total - length, total))  # (B, L, S)
            rows = a_hat if i == 0 else a_hat @ new[i - 1]
            if self.rows:
                rows = torch.cat([F.pad(self.rows[i], (0, length)), rows], dim=1)
            new.append(rows)
        self.rows = new
        return new[-1][:, -1]


class _Steps:
    """What the gradient methods keep across steps: embedding leaves and differentiable maps per layer."""

    def __init__(self) -> None:
        self.embeds: list[Tensor] = []
        self.blocks: list[list[Tensor]] = []  # per layer, per step (B, H, L, Lk) over the last Lk positions
        self.positions: list[int] = []  # per step: positions seen (cached + new)
        self.names: list[str] = []

    def add(self, embeds: Tensor, maps: list[Tensor] | None, names: list[str], positions: int) -> None:
        self.embeds.append(embeds)
        self.positions.append(positions)
        if maps is not None:
            if not self.blocks:
                self.blocks = [[] for _ in maps]
                self.names = names
            for per_layer, a in zip(self.blocks, maps):
                per_layer.append(a)

    def attribute(self, score: Tensor, methods: tuple[str, ...], retain: bool) -> dict[str, Tensor]:
        """``{method: (B, S)}`` for the gradient methods, from one backward pass of ``score`` ``(B,)``."""
        flat = [a for per_layer in self.blocks for a in per_layer] if "relevance" in methods else []
        grads = torch.autograd.grad(score.sum(), self.embeds + flat, retain_graph=retain, allow_unused=True)
        out = {}
        for name in ("grad_input", *sorted(_LRP)):  # gradient x input; under the LRP rules, LRP relevance
            if name in methods:
                g = torch.cat([torch.zeros_like(e) if d is None else d for e, d in zip(self.embeds, grads)], dim=1)
                out[name] = (g * torch.cat([e.detach() for e in self.embeds], dim=1)).sum(-1)
        if "relevance" in methods:
            it = iter(grads[len(self.embeds) :])
            maps, map_grads = [], []
            total = self.positions[-1]

            def full(blocks: list[Tensor]) -> Tensor:  # (B, H, S, S) from the rows of every step
                return torch.cat(
                    [F.pad(_keys_at_positions(a, p), (0, total - p)) for a, p in zip(blocks, self.positions)], dim=-2
                )

            for per_layer in self.blocks:
                maps.append(full([a.detach() for a in per_layer]))
                map_grads.append(full([torch.zeros_like(a) if (g := next(it)) is None else g for a in per_layer]))
            rel, streams = propagate_relevance(maps, map_grads, ["self"] * len(maps), self.names)
            out["relevance"] = rel[(streams[-1], streams[-1])][:, -1]
        return out


def generate_attribution(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    methods: str | Sequence[str] = ("rollout",),
    foil: int | Tensor | None = None,
    forced_tokens: Tensor | None = None,
    layer: int = -1,
) -> GenerationAttribution:
    """Generate ``max_new_tokens`` tokens greedily with the KV cache and attribute each to the tokens before it.

    Args:
        model: a decoder-only model in eval mode: a Hugging Face ``*ForCausalLM`` running with
            ``attn_implementation="attnkit"`` (or ``"sdpa"``), or an attnkit decoder such as
            :class:`attnkit.models.char_decoder.CharDecoder`.
        input_ids: ``(B, P)`` prompt ids, left-padded.
        attention_mask: ``(B, P)`` 1 for real tokens, 0 for padding (left); default all real.
        max_new_tokens: ``N >= 1``.
        methods: one or more of :data:`GENERATION_METHODS` (module docstring), computed in the same pass.
        foil: contrastive explanations (gradient methods only): the foil token id, one per prompt ``(B,)``, or
            one per step ``(B, N)``; the explained score becomes ``logit[target] - logit[foil]``.
        forced_tokens: ``(B, n)`` with ``n <= N``: take these as the first ``n`` tokens instead of the greedy
            choice (explain a given continuation); the remaining steps are greedy.
        layer: the layer of ``"raw"`` (default the last).

    Returns:
        :class:`GenerationAttribution` (scores in the dtype of the captured maps or of the embeddings).

    Raises:
        ValueError: bad ids, a mask that is not left padding, ``max_new_tokens < 1``, unknown methods, a foil
            with attention-only methods, token tensors of the wrong shape, ``layer`` out of range.
        TypeError: a model no adapter can step (see :mod:`attnkit.explain._decoders`).
        RuntimeError: no attention captured (see :func:`attnkit.explain.capture`), or a step whose number of
            attention layers differs from the first.

    References:
        Abnar & Zuidema 2020 (rollout, Sec. 3); Chefer, Gur & Wolf 2021 (relevance, Eq. 5-6); Shrikumar et al.
        2016, "Not Just a Black Box" (gradient x input); Yin & Neubig 2022 (contrastive, Sec. 2).
    """
    methods = _check_methods(methods)
    if _LRP & set(methods) and len(methods) > 1:
        raise ValueError(
            f"generate_attribution: {', '.join(sorted(_LRP & set(methods)))} change the gradients of every other "
            "method; compute them in a call of their own"
        )
    if foil is not None and not set(methods) <= _GRADIENT:
        raise ValueError(
            f"generate_attribution: a foil needs gradient methods ({', '.join(sorted(_GRADIENT))}); "
            f"{', '.join(m for m in methods if m not in _GRADIENT)} do not depend on the explained token"
        )
    ids, mask = _check_prompt(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate_attribution: expected max_new_tokens to be a positive int, got {max_new_tokens!r}")
    batch, prompt_len = ids.shape
    n = max_new_tokens
    forced = _check_tokens(forced_tokens, "forced_tokens", batch, n, allow_short=True)
    foils = _check_tokens(foil, "foil", batch, n, allow_short=False)
    adapter = adapter_for(model)
    need_grad = bool(_GRADIENT & set(methods))
    total = prompt_len + n
    scores: dict[str, Tensor] = {}
    explained = []
    rollout_state, steps = _Rollout(), _Steps()
    cache = adapter.new_cache()
    step_ids, positions = ids, (mask.cumsum(-1) - 1).clamp_min(0)
    num_layers = None
    with ExitStack() as stack:
        stack.enter_context(torch.enable_grad() if need_grad else torch.no_grad())
        if _LRP & set(methods):
            _lrp_rules(model, methods[0], stack)
        for t in range(n):
            embeds = adapter.embed(step_ids)
            if need_grad:
                embeds = embeds.detach().requires_grad_(True)
            maps, names = None, []
            if _MAPS & set(methods):
                with capture(model, differentiable="relevance" in methods) as rec:
                    logits, cache = adapter.forward(embeds, mask, positions, cache)
                records = [m for m in rec.maps if m.is_self]
                maps, names = [m.weights for m in records], [m.name for m in records]
                if num_layers is None:
                    num_layers = len(maps)
                    if not -num_layers <= layer < num_layers:
                        raise ValueError(f"generate_attribution: layer must be in [0, {num_layers}), got {layer}")
                elif len(maps) != num_layers:
                    raise RuntimeError(
                        f"generate_attribution: step {t} ran {len(maps)} self-attention layers, the prompt {num_layers}"
                    )
            else:
                logits, cache = adapter.forward(embeds, mask, positions, cache)
            last = logits[:, -1]  # (B, V)
            target = forced[:, t] if forced is not None and t < forced.shape[1] else last.detach().argmax(-1)
            score = last.gather(1, target[:, None].to(last.device))[:, 0]
            if foils is not None:
                score = score - last.gather(1, foils[:, t, None].to(last.device))[:, 0]
            explained.append(score.detach())
            rows: dict[str, Tensor] = {}
            if "raw" in methods:
                rows["raw"] = _keys_at_positions(maps[layer][:, :, -1].detach(), mask.shape[1]).mean(1)
            if "rollout" in methods:
                rows["rollout"] = rollout_state.extend([_keys_at_positions(a.detach(), mask.shape[1]) for a in maps])
            if need_grad:
                steps.add(embeds, maps if "relevance" in methods else None, names, mask.shape[1])
                rows.update(steps.attribute(score, methods, retain=t < n - 1))
            for name, row in rows.items():
                if name not in scores:
                    scores[name] = row.new_zeros(batch, n, total)
                scores[name][:, t, : row.shape[-1]] = row.detach()
            ids = torch.cat([ids, target[:, None].to(ids)], dim=1)
            mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
            step_ids, positions = target[:, None].to(ids), mask.sum(-1, keepdim=True) - 1
    for name in scores:  # padding columns are 0
        scores[name] = scores[name] * mask[:, None, :].to(scores[name].dtype)
    return GenerationAttribution(
        scores=scores,
        sequences=ids,
        attention_mask=mask,
        prompt_length=prompt_len,
        explained=torch.stack(explained, 1),
        foils=foils,
    )
