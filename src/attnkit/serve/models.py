"""The models a service explains: a registry of loaders and one endpoint class per input kind.

``TextEndpoint`` wraps a BERT- or GPT-2-family checkpoint (:func:`attnkit.text.load_text_model`) and predicts the
sentence embedding's nearest labels; ``ImageEndpoint`` wraps a :class:`attnkit.vision.VisionTransformer` classifier.
Both run the model once inside :func:`attnkit.explain.capture` and derive the prediction, the explanation and the
maps for the layer/head browser from that one forward pass (``relevance`` adds one differentiable forward and a
backward, as it must); the health statistics are computed from the same maps later, off the request path
(:mod:`attnkit.serve.stats_writer`).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.serve.health import HealthInputs

__all__ = [
    "DEFAULT_LABELS",
    "DEFAULT_LABEL_TEMPLATE",
    "SHIPPED",
    "Endpoint",
    "Explained",
    "ImageEndpoint",
    "ModelLoadError",
    "TextEndpoint",
    "load_endpoint",
    "weights_sha256",
]

#: Labels a text model's sentence embedding is matched against when a request names none; each is embedded as
#: ``DEFAULT_LABEL_TEMPLATE.format(label)`` ("news about sports"), which MiniLM matches far better than the bare
#: topic (10 of 10 one-sentence news items right instead of 6 of 10 in ``benchmarks/serve.py``'s texts and four
#: more). Labels a request gives are embedded as they are.
DEFAULT_LABEL_TEMPLATE = "news about {}"
DEFAULT_LABELS = (
    "business and finance",
    "sports",
    "politics",
    "science and technology",
    "health and medicine",
    "entertainment",
    "travel",
    "food and cooking",
    "weather",
    "nature and animals",
)


class ModelLoadError(ValueError):
    """A ``--model NAME=SOURCE`` that cannot be served (the message names the source and what is wrong)."""


class OptionError(ValueError):
    """A request option out of range; ``field`` names it (e.g. ``"options.layer"``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass
class Explained:
    """What an endpoint returns for one input.

    Attributes:
        prediction: JSON-ready prediction (``{"label", "score", "top": [...]}``).
        explanation: JSON-ready explanation (``{"tokens", "scores"}`` or ``{"grid", "heatmap", "image_size"}``).
        maps: ``(layers, H, L, L)`` attention probabilities of the real tokens, for the layer/head browser.
        tokens: ``L`` labels of the maps' rows and columns.
        health: what the attention-health statistics are computed from (off the request path).
        timings: milliseconds per phase (``forward_ms``: the captured forward; ``explain_ms``: the method and
            the answer's data).
    """

    prediction: dict[str, Any]
    explanation: dict[str, Any]
    maps: Tensor
    tokens: list[str]
    health: HealthInputs
    timings: dict[str, float] = field(default_factory=dict)


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes, in name order): what was loaded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _check_layer_head(options: dict[str, Any], layers: int, heads: int) -> tuple[int | None, int | None]:
    layer, head = options.get("layer"), options.get("head")
    if layer is not None and not -layers <= layer < layers:
        raise OptionError(
            "options.layer", f"options.layer must be in [-{layers}, {layers}) for this model, got {layer}"
        )
    if head is not None and not 0 <= head < heads:
        raise OptionError("options.head", f"options.head must be in [0, {heads}) for this model, got {head}")
    return layer, head


def _top(values: list[float], k: int) -> list[int]:
    """Indices of the ``k`` largest ``values``, largest first (ties: the lower index first, as ``argmax``)."""
    return sorted(range(len(values)), key=lambda i: -values[i])[:k]


@lru_cache(maxsize=64)
def _grid_tokens(num_tokens: int, prefix: int, grid_width: int) -> tuple[str, ...]:
    """Labels of a ViT's tokens: ``[CLS]`` for the prefix, ``(row,col)`` for the patches (the same every request)."""
    return tuple(
        "[CLS]" if i < prefix else f"({(i - prefix) // grid_width},{(i - prefix) % grid_width})"
        for i in range(num_tokens)
    )


class Endpoint:
    """A served model. Subclasses set ``kind``, ``methods``, ``model`` and implement :meth:`explain`."""

    kind: str
    methods: tuple[str, ...] = ("raw", "rollout", "relevance", "flow")
    description: str = ""

    def __init__(self, name: str, model: nn.Module) -> None:
        self.name = name
        self.model = model.eval()
        self.weights_sha256 = weights_sha256(model)

    def _learn_plan(self, example: Callable[[], object]) -> None:
        """capture's hooks for this model, worked out once from one ``example`` forward: only the modules that
        compute attention (and the model) get stack hooks (:func:`attnkit.explain.capture_plan`)."""
        from attnkit.explain import capture_plan

        with torch.inference_mode():
            self.capture_plan = capture_plan(self.model, example=example)

    def explain(self, data: Any, method: str, options: dict[str, Any]) -> Explained:
        """Explain one input: its prediction, ``method``'s scores and the attention maps, from one captured forward.

        Args:
            data: one input as the subclass takes it: a ``str`` (:class:`TextEndpoint`) or a ``(C, S, S)``
                float32 tensor of pixels in ``[0, 1]`` at the model's ``image_size`` S (:class:`ImageEndpoint`).
            method: one of :attr:`methods` (the service checks it first):

                * ``"raw"``: the summarising token's attention row in ``options["layer"]`` (default the last),
                  ``options["head"]`` (default the mean over heads);
                * ``"rollout"``: attention rollout over all layers with the residual identity (Abnar & Zuidema
                  2020, "Quantifying Attention Flow in Transformers", Sec. 3; :func:`attnkit.explain.rollout`);
                * ``"relevance"``: gradient-weighted relevance (Chefer, Gur & Wolf 2021, Eq. 5-11;
                  :func:`attnkit.explain.relevance`): one more differentiable forward and a backward;
                * ``"flow"``: maximum attention flow (Abnar & Zuidema 2020, Sec. 3;
                  :func:`attnkit.explain.attention_flow`).

            options: the request's options: ``layer`` (int, negative counts from the last layer; ``raw`` only),
                ``head`` (int; ``raw`` only), ``top_k`` (int, predictions returned, default 5), ``labels`` (text
                only).

        Returns:
            an :class:`Explained`.

        Raises:
            OptionError: ``options.layer`` outside ``[-layers, layers)`` or ``options.head`` outside
                ``[0, H)`` for this model (``field`` names the option).
            NotImplementedError: on the base class.
        """
        raise NotImplementedError

    def forward(self, data: Any) -> Any:
        """The plain forward pass (no capture, no explanation), the baseline of the latency target."""
        raise NotImplementedError

    def stored_tokens(self, tokens: list[str]) -> list[str]:
        """The token labels a record keeps when inputs are not stored (``--no-store-inputs``).

        An image model's labels (``[CLS]``, ``(row,col)``) name places of its grid, not the input: kept as they are.
        """
        return list(tokens)

    def info(self) -> dict[str, Any]:
        """``{"name", "kind", "methods", "weights_sha256", "description"}`` of this endpoint (``GET /v1/health``)."""
        return {
            "name": self.name,
            "kind": self.kind,
            "methods": list(self.methods),
            "weights_sha256": self.weights_sha256,
            "description": self.description,
        }


class TextEndpoint(Endpoint):
    """A text encoder explained token by token; its prediction is the nearest labels of the sentence embedding.

    Args:
        name: the served name.
        path: a Hugging Face checkpoint directory (BERT or GPT-2 family); ``None``: the shipped MiniLM.
        labels: default labels for the nearest-label prediction.
        max_tokens: inputs are truncated to this many tokens (the answer says when).
    """

    kind = "text"

    def __init__(self, name: str, path: str | Path | None = None, *, labels=DEFAULT_LABELS, max_tokens=128) -> None:
        from attnkit.text import TextModelError, load_text_model

        try:
            self.tm = load_text_model(path)
        except (TextModelError, ImportError) as exc:
            raise ModelLoadError(f"--model {name}: {exc}") from None
        super().__init__(name, self.tm.model)
        self.description = f"{self.tm.name} ({self.tm.family}), sentence embedding -> nearest labels"
        self.max_tokens = max_tokens
        self.default_labels = tuple(labels)
        self._label_cache: dict[str, Tensor] = {}
        special = getattr(self.tm.tokenizer, "all_special_tokens", [])
        self.special_tokens = frozenset(special)
        # the tokens the tokenizer puts around every text ([CLS] ... [SEP]): how many before and after it
        template = self.tm.tokens(self.encode("")["input_ids"][0])
        probe = self.tm.tokens(self.encode("x")["input_ids"][0])
        before = next((i for i, (a, b) in enumerate(zip(template, probe)) if a != b), min(len(template), len(probe)))
        self._template = (before, len(template) - before)
        self._learn_plan(lambda: self.tm.forward(self.encode("An example sentence.")))

    def encode(self, text: str) -> dict[str, Tensor]:
        """The tokenizer's batch of one text, truncated to ``max_tokens``: ``input_ids`` and ``attention_mask``
        ``(1, L)`` int64, plus ``token_type_ids`` for the BERT family."""
        return self.tm.encode([text], max_length=self.max_tokens)

    def stored_tokens(self, tokens: list[str]) -> list[str]:
        """The token labels a record keeps when inputs are not stored: positions ``"#i"``, except the tokens the
        tokenizer puts around every text (``[CLS]`` first, ``[SEP]`` last for BERT; none for GPT-2). A special
        token inside the text (``[MASK]`` typed by the user, ``[UNK]`` for an emoji) is input and becomes a position.
        """
        before, after = self._template
        return [t if i < before or i >= len(tokens) - after else f"#{i}" for i, t in enumerate(tokens)]

    def forward(self, data: str) -> Tensor:
        """The plain forward pass of ``data`` (no capture): the ``(1, L, E)`` last hidden states."""
        with torch.inference_mode():
            return self.tm.forward(self.encode(data))

    def _embed(self, hidden: Tensor, mask: Tensor) -> Tensor:
        from attnkit.models import mean_pooling

        return mean_pooling(hidden, mask, normalize=True)

    def _label_embeddings(self, labels: Sequence[str]) -> Tensor:
        """``(len(labels), E)`` unit embeddings of ``labels`` (prompts such as "news about sports"), cached."""
        missing = [label for label in labels if label not in self._label_cache]
        if missing:
            batch = self.tm.encode(list(missing), max_length=self.max_tokens)
            with torch.inference_mode():
                emb = self._embed(self.tm.forward(batch), batch["attention_mask"])
            if len(self._label_cache) > 4096:
                self._label_cache.clear()
            self._label_cache.update(zip(missing, emb))
        return torch.stack([self._label_cache[label] for label in labels])

    def explain(self, data: str, method: str, options: dict[str, Any]) -> Explained:
        """Explain one text: token importances for the summarising token and the nearest labels.

        Args:
            data: the text (truncated to ``max_tokens`` tokens; ``explanation["truncated"]`` says when).
            method: ``"raw"``, ``"rollout"``, ``"relevance"`` or ``"flow"`` (see :meth:`Endpoint.explain`;
                :func:`attnkit.text.token_scores` computes them; ``relevance`` explains the norm of the mean-pooled
                sentence representation).
            options: ``layer``, ``head`` (``raw`` only), ``top_k`` (default 5), ``labels`` (default
                :data:`DEFAULT_LABELS`, each embedded as ``DEFAULT_LABEL_TEMPLATE.format(label)``; labels a request
                gives are embedded as they are).

        Returns:
            an :class:`Explained`: ``prediction`` ``{"label", "score", "top", "kind": "nearest_labels"}`` where
            ``score`` is the cosine similarity (``[-1, 1]``, not a probability) of the normalised mean-pooled
            sentence embedding to the label's embedding, ``top`` the ``top_k`` nearest labels; ``explanation``
            ``{"tokens", "scores", "summary_token", "truncated"}`` with one score per token (``raw``, ``rollout``
            and ``flow`` scores sum to about 1);
            ``maps`` ``(layers, H, L, L)`` float32.

        Raises:
            OptionError: ``options.layer`` outside ``[-layers, layers)`` or ``options.head`` outside ``[0, H)``.
        """
        from attnkit.text import capture_maps, summary_index, token_scores

        t0 = time.perf_counter()
        batch = self.encode(data)
        maps, hidden = capture_maps(self.tm, batch, plan=self.capture_plan, kernel="math")  # see ImageEndpoint
        t1 = time.perf_counter()
        stacked = torch.stack(maps)[:, 0]  # (layers, H, L, L); one input, no padding
        layer, head = _check_layer_head(options, stacked.shape[0], stacked.shape[1])
        scores = token_scores(self.tm, batch, method=method, layer=layer, head=head, maps=maps)[0]
        labels = list(options.get("labels") or self.default_labels)
        prompts = labels if options.get("labels") else [DEFAULT_LABEL_TEMPLATE.format(label) for label in labels]
        cosines = (self._label_embeddings(prompts) @ self._embed(hidden, batch["attention_mask"])[0].float()).tolist()
        top = [{"label": labels[i], "score": round(cosines[i], 6)} for i in _top(cosines, options.get("top_k", 5))]
        tokens = self.tm.tokens(batch["input_ids"][0])
        row = int(summary_index(batch["attention_mask"], self.tm.summary_row)[0])
        sinks = [i for i, tok in enumerate(tokens) if tok in self.special_tokens]
        reuse = scores if method == "rollout" else None  # the rollout row is the explanation itself
        health = HealthInputs(stacked, tuple(sinks), row, top[0]["score"], reuse)
        t3 = time.perf_counter()
        return Explained(
            prediction={"label": top[0]["label"], "score": top[0]["score"], "top": top, "kind": "nearest_labels"},
            explanation={
                "tokens": tokens,
                "scores": torch.round(scores.double(), decimals=6).tolist(),
                "summary_token": row,
                "truncated": bool(len(tokens) >= self.max_tokens),
            },
            maps=stacked,
            tokens=tokens,
            health=health,
            timings={"forward_ms": (t1 - t0) * 1e3, "explain_ms": (t3 - t1) * 1e3},
        )


class ImageEndpoint(Endpoint):
    """A Vision Transformer classifier explained over its patch grid (class-token row).

    Args:
        name: the served name.
        model: a :class:`attnkit.vision.VisionTransformer` returning ``(B, classes)`` logits.
        image_size: the square input side in pixels.
        channels: 1 (grey) or 3 (RGB).
        normalize: ``(mean, std)`` per channel, or ``None`` for inputs in ``[0, 1]``.
        class_names: one label per class (default the class indices).
        invert_light: grey images brighter than mid-grey are inverted (ink on black, the digits convention).
    """

    kind = "image"

    def __init__(
        self,
        name: str,
        model: nn.Module,
        *,
        image_size: int,
        channels: int,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
        class_names: Sequence[str] | None = None,
        invert_light: bool = False,
        description: str = "",
    ) -> None:
        super().__init__(name, model)
        self.image_size, self.channels, self.invert_light = image_size, channels, invert_light
        self.normalize = normalize
        self.class_names = list(class_names) if class_names is not None else None
        self.description = description
        self._learn_plan(lambda: self.model(torch.zeros(1, channels, image_size, image_size)))

    def prepare(self, pixels: Tensor) -> Tensor:
        """``(1, C, S, S)`` model input from ``(C, S, S)`` pixels in ``[0, 1]``."""
        x = pixels[None]
        if self.normalize is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in self.normalize)
            x = (x - mean) / std
        return x

    def forward(self, data: Tensor) -> Tensor:
        """The plain forward pass of ``(C, S, S)`` pixels in ``[0, 1]`` (no capture): ``(1, classes)`` logits."""
        with torch.inference_mode():
            return self.model(self.prepare(data))

    def explain(self, data: Tensor, method: str, options: dict[str, Any]) -> Explained:
        """Explain one image: the class-token row of ``method`` over the patch grid, and the top classes.

        Args:
            data: ``(C, S, S)`` float32 pixels in ``[0, 1]``, ``C`` = :attr:`channels`, ``S`` = :attr:`image_size`
                (normalised here with ``normalize``).
            method: ``"raw"``, ``"rollout"``, ``"relevance"`` (for the predicted class's logit) or ``"flow"``
                (see :meth:`Endpoint.explain`); the service admits only these.
            options: ``layer``, ``head`` (``raw`` only), ``top_k`` (default 5).

        Returns:
            an :class:`Explained`: ``prediction`` ``{"label", "class", "score", "top", "kind": "class"}`` where
            ``score`` is the top class's softmax probability; ``explanation`` ``{"grid": [Gh, Gw], "heatmap"
            (Gh x Gw nested lists), "image_size": [S, S]}`` (the class-token row without prefix tokens);
            ``maps`` ``(layers, H, L, L)`` float32 with ``L`` = prefix tokens + ``Gh * Gw``.

        Raises:
            OptionError: ``options.layer`` outside ``[-layers, layers)`` or ``options.head`` outside ``[0, H)``.
        """
        from attnkit.explain import attention_flow, capture, relevance, rollout

        t0 = time.perf_counter()
        x = self.prepare(data)
        # kernel="math": the forward's own probabilities are recorded instead of recomputed (one computation)
        with torch.inference_mode(), capture(self.model, plan=self.capture_plan, kernel="math") as rec:
            logits = self.model(x)
        t1 = time.perf_counter()
        maps = torch.cat([m.weights for m in rec.maps if m.is_self]).float()  # (layers, H, L, L): one image
        layout = self.model.token_layout
        prefix, (gh, gw) = layout["num_prefix_tokens"], layout["grid"]
        layer, head = _check_layer_head(options, maps.shape[0], maps.shape[1])
        probs = logits[0].softmax(-1, dtype=torch.float32).tolist()
        pred = _top(probs, 1)[0]
        if method == "raw":
            m = maps[-1 if layer is None else layer]
            row = (m.mean(0) if head is None else m[head])[0]
        elif method == "rollout":
            row = rollout(maps[:, None])[0, 0]
        elif method == "relevance":
            row = relevance(self.model, x, pred).get()[0, 0].float()
        else:
            row = attention_flow(maps[:, None], rows=[0], solver="scipy")[0, 0].float()
        grid = row[prefix:].reshape(gh, gw)
        names = self.class_names or [str(i) for i in range(len(probs))]
        top = [
            {"label": names[i], "score": round(probs[i], 6), "class": i} for i in _top(probs, options.get("top_k", 5))
        ]
        tokens = list(_grid_tokens(len(row), prefix, gw))
        health = HealthInputs(maps, tuple(range(prefix)), 0, probs[pred], row if method == "rollout" else None)
        t3 = time.perf_counter()
        return Explained(
            prediction={"label": names[pred], "class": pred, "score": top[0]["score"], "top": top, "kind": "class"},
            explanation={
                "grid": [gh, gw],
                "heatmap": torch.round(grid.double(), decimals=6).tolist(),
                "image_size": [self.image_size, self.image_size],
            },
            maps=maps,
            tokens=tokens,
            health=health,
            timings={"forward_ms": (t1 - t0) * 1e3, "explain_ms": (t3 - t1) * 1e3},
        )


# -- the registry of sources ----------------------------------------------------------------------------------
def _shipped_minilm(name: str, **kwargs) -> Endpoint:
    return TextEndpoint(name, None, **kwargs)


def _shipped_digits_vit(name: str, **_) -> Endpoint:
    from attnkit.vision.digits import load_model

    try:
        model = load_model("vit")
    except (FileNotFoundError, ValueError) as exc:  # ValueError: attnkit.io.CheckpointError
        raise ModelLoadError(f"--model {name}: {exc}") from None
    return ImageEndpoint(
        name,
        model,
        image_size=64,
        channels=1,
        class_names=[str(i) for i in range(10)],
        invert_light=True,
        description="VisionTransformer trained on handwritten digits on 64x64 canvases (shipped)",
    )


#: Shipped sources: ``--model NAME=minilm`` or ``NAME=digits-vit``; ``attnkit serve`` alone serves both.
SHIPPED: dict[str, Callable[..., Endpoint]] = {"minilm": _shipped_minilm, "digits-vit": _shipped_digits_vit}


def _hf_vit(name: str, path: Path, config: dict[str, Any]) -> Endpoint:
    from attnkit.models import CheckpointError
    from attnkit.vision import VisionTransformer

    try:
        model = VisionTransformer.from_pretrained(path)
    except (CheckpointError, OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {name}={path}: {exc}") from None
    mean, std = [0.5] * 3, [0.5] * 3  # transformers' ViTImageProcessor defaults
    processor = path / "preprocessor_config.json"
    if processor.is_file():
        pre = json.loads(processor.read_text())
        mean, std = pre.get("image_mean", mean), pre.get("image_std", std)
    id2label = config.get("id2label") or {}
    names = [id2label.get(str(i), str(i)) for i in range(len(id2label))] or None
    channels = int(config.get("num_channels", 3))
    return ImageEndpoint(
        name,
        model,
        image_size=int(config.get("image_size", 224)),
        channels=channels,
        normalize=(mean[:channels], std[:channels]),
        class_names=names,
        description=f"VisionTransformer from {path.name}",
    )


def load_endpoint(name: str, source: str | None = None, *, max_tokens: int = 128) -> Endpoint:
    """Load ``source`` (a :data:`SHIPPED` name or a checkpoint directory; default ``name`` itself) as ``name``.

    A directory whose ``config.json`` has ``model_type: "vit"`` becomes an :class:`ImageEndpoint`, any other a
    :class:`TextEndpoint` (BERT or GPT-2 family).

    Args:
        name: the served name.
        source: a :data:`SHIPPED` name or a checkpoint directory.
        max_tokens: text inputs are truncated to this many tokens.

    Returns:
        the endpoint, ready to explain.

    Raises:
        ModelLoadError: an unknown source, a directory without a usable checkpoint.
    """
    source = name if source is None else source
    if source in SHIPPED:
        return SHIPPED[source](name, max_tokens=max_tokens)
    path = Path(source).expanduser()
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(
            f"--model {name}={source}: not a shipped model ({', '.join(SHIPPED)}) nor a checkpoint directory "
            "with config.json"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"--model {name}={source}: config.json is not valid JSON ({exc})") from None
    if config.get("model_type") == "vit":
        return _hf_vit(name, path, config)
    return TextEndpoint(name, path, max_tokens=max_tokens)
