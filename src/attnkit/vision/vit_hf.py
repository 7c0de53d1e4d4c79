"""The Hugging Face ViT checkpoint format (``ViTModel`` / ``ViTForImageClassification``): tensor names and config
fields, translated for :meth:`attnkit.vision.VisionTransformer.from_pretrained` (this module does not import the
model, so the model may import it)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from attnkit.io.checkpoint import CheckpointError, TensorInfo, config_int, layer_count

__all__ = ["hf_vit_key", "vit_kwargs"]

# Per-layer names: the on-disk layout written by save_pretrained (encoder.layer.i...) and the in-memory layout
# of transformers >= 5 (layers.i...), both mapped to attnkit.nn.TransformerEncoderLayer names.
_LAYER_KEYS = {
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.out_proj",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_TOP_KEYS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "pooler.dense.weight": "pooler.dense.weight",
    "pooler.dense.bias": "pooler.dense.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}


def hf_vit_key(name: str) -> str | None:
    """The :class:`VisionTransformer` state-dict name of a transformers ViT checkpoint tensor.

    The ``vit.`` prefix of task checkpoints is dropped; ``embeddings.mask_token`` (masked image modeling) is
    skipped (``None``); unknown names are returned unchanged (so the loader reports them as unexpected).
    """
    bare = name.removeprefix("vit.")
    if bare == "embeddings.mask_token":
        return None
    if bare in _TOP_KEYS:
        return _TOP_KEYS[bare]
    match = _LAYER.match(bare)
    if match and match.group(2) in _LAYER_KEYS:
        return f"blocks.{match.group(1)}.{_LAYER_KEYS[match.group(2)]}.{match.group(3)}"
    return name


def _int(config: dict, key: str, source: str, default: int | None = None) -> int:
    return config_int(config, key, source, default=default, maximum=2**20)


def vit_kwargs(config: dict, header: Mapping[str, TensorInfo], source: str) -> dict[str, Any]:
    """:class:`VisionTransformer` constructor arguments for a transformers ViT ``config.json`` and the header of
    its weights (names as on disk), checked against each other before anything is built.

    The model gets ``layer_norm_eps`` from the config (transformers' default 1e-12), a ``pooler`` when the
    checkpoint has ``pooler.dense``, and a head of ``classifier``'s width when there is one.

    Raises:
        CheckpointError: not a ViT config, options this model does not have (``hidden_act`` other than
            ``"gelu"``, ``qkv_bias=False``, a pooler of another width or activation), sizes that are not positive
            integers (``image_size`` and ``patch_size`` are single integers, as transformers writes them), or a
            layer count that differs from the weights.
    """
    if config.get("model_type", "vit") != "vit":
        raise CheckpointError(
            f"{source}: expected a ViT checkpoint (model_type 'vit'), got {config['model_type']!r:.60}"
        )
    embed_dim = _int(config, "hidden_size", source)
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r:.60} is not supported; expected 'gelu'")
    if config.get("qkv_bias", True) is not True:
        raise CheckpointError(f"{source}: qkv_bias=False is not supported (attnkit's ViT has query/key/value biases)")
    eps = config.get("layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
        raise CheckpointError(f"{source}: config.json needs 'layer_norm_eps' in (0, 1), got {eps!r:.60}")
    names = {hf_vit_key(n): info for n, info in header.items()}
    has_pooler = "pooler.dense.weight" in names
    if has_pooler and (
        config.get("pooler_act", "tanh") != "tanh" or config.get("pooler_output_size", embed_dim) != embed_dim
    ):
        raise CheckpointError(f"{source}: only a tanh pooler of width hidden_size ({embed_dim}) is supported")
    depth = _int(config, "num_hidden_layers", source)
    found = layer_count(names, "blocks.")
    if depth != found:
        raise CheckpointError(f"{source}: config.json says num_hidden_layers={depth}, the weights hold {found}")
    head = names.get("head.weight")
    return {
        "image_size": _int(config, "image_size", source, 224),
        "patch_size": _int(config, "patch_size", source, 16),
        "in_chans": _int(config, "num_channels", source, 3),
        "num_classes": head.shape[0] if head is not None and head.shape else 0,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": _int(config, "num_attention_heads", source),
        "mlp_ratio": _int(config, "intermediate_size", source) / embed_dim,
        "pooler": has_pooler,
        "layer_norm_eps": float(eps),
    }
