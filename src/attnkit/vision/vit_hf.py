"""Loading Hugging Face ViT checkpoints (``ViTModel`` / ``ViTForImageClassification``) into
:class:`attnkit.vision.VisionTransformer`."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from attnkit.models._checkpoint import CheckpointError, load_state, read_config, read_tensors
from attnkit.vision.vit import VisionTransformer

__all__ = ["hf_vit_key", "load_hf_vit"]

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


def _require(config: dict, key: str, kinds: type | tuple[type, ...], source: str):
    if key not in config or not isinstance(config[key], kinds) or isinstance(config[key], bool):
        raise CheckpointError(f"{source}: config.json needs {key!r} of type {kinds}, got {config.get(key)!r}")
    return config[key]


def load_hf_vit(
    path: str | Path,
    *,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> VisionTransformer:
    """Build a :class:`VisionTransformer` from a Hugging Face ViT checkpoint directory.

    Reads ``config.json`` and ``model.safetensors`` as written by ``ViTModel.save_pretrained`` or
    ``ViTForImageClassification.save_pretrained`` (safetensors only; pickle files are never read). The model gets
    ``layer_norm_eps`` from the config (transformers' default 1e-12), a ``pooler`` when the checkpoint has
    ``pooler.dense`` (then ``model(x)`` equals ``ViTModel``'s ``pooler_output``), and a head of
    ``classifier``'s width when there is one (then ``model(x)`` equals ``ViTForImageClassification``'s logits);
    ``forward_features`` equals ``last_hidden_state`` for every checkpoint. Inputs of another size than
    ``image_size`` get interpolated positions, as transformers' ``interpolate_pos_encoding=True``.

    Args:
        path: the checkpoint directory.
        backend: :func:`attnkit.attention` backend for every layer.
        device: where to put the model (default CPU).
        dtype: parameter dtype (default float32); floating checkpoint tensors are cast to it.

    Returns:
        the model, in eval mode.

    Raises:
        FileNotFoundError, NotADirectoryError: no such directory, or no ``config.json`` / ``model.safetensors``.
        CheckpointError: (a ``ValueError``) a config that is not a ViT or uses options this model does not have
            (``hidden_act`` other than ``"gelu"``, ``qkv_bias=False``, a pooler of another width or activation),
            or tensors that are missing, unexpected or mis-shaped (all listed).
        ImportError: ``safetensors`` is missing (``pip install attnkit[hf]``).
    """
    source = f"checkpoint {str(path)!r}"
    config = read_config(path)
    if config.get("model_type", "vit") != "vit":
        raise CheckpointError(f"{source}: expected a ViT checkpoint (model_type 'vit'), got {config['model_type']!r}")
    embed_dim = _require(config, "hidden_size", int, source)
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported; expected 'gelu'")
    if not config.get("qkv_bias", True):
        raise CheckpointError(f"{source}: qkv_bias=False is not supported (attnkit's ViT has query/key/value biases)")
    tensors = read_tensors(path)
    names = {hf_vit_key(n) for n in tensors}
    has_pooler = "pooler.dense.weight" in names
    if has_pooler and (
        config.get("pooler_act", "tanh") != "tanh" or config.get("pooler_output_size", embed_dim) != embed_dim
    ):
        raise CheckpointError(f"{source}: only a tanh pooler of width hidden_size ({embed_dim}) is supported")
    head = next((t for n, t in tensors.items() if hf_vit_key(n) == "head.weight"), None)
    try:
        model = VisionTransformer(
            image_size=_require(config, "image_size", (int, list), source),
            patch_size=_require(config, "patch_size", (int, list), source),
            in_chans=config.get("num_channels", 3),
            num_classes=0 if head is None else head.shape[0],
            embed_dim=embed_dim,
            depth=_require(config, "num_hidden_layers", int, source),
            num_heads=_require(config, "num_attention_heads", int, source),
            mlp_ratio=_require(config, "intermediate_size", int, source) / embed_dim,
            pooler=has_pooler,
            layer_norm_eps=config.get("layer_norm_eps", 1e-12),
            backend=backend,
            device=device,
            dtype=dtype,
        )
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: config.json describes an invalid model: {err}") from None
    load_state(model, tensors, hf_vit_key, source=source)
    return model.eval()
