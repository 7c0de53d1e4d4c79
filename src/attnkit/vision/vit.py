"""Vision Transformer (Dosovitskiy et al. 2021, https://arxiv.org/abs/2010.11929) on attnkit.nn layers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.nn.encoder_layer import TransformerEncoderLayer
from attnkit.vision._common import check_int
from attnkit.vision.patch_embed import PatchEmbed, to_pair

__all__ = ["VisionTransformer", "interpolate_pos_embed"]

_POOLS = ("token", "mean")


def interpolate_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> Tensor:
    """Resize learned patch position embeddings ``(1, Gh·Gw, E)`` from ``old_grid`` to ``new_grid``.

    Bicubic interpolation over the 2-D grid with ``align_corners=False`` (Dosovitskiy et al. 2021, Sec. 3.2,
    "2D interpolation of the pre-trained position embeddings"; the same call as transformers'
    ``ViTEmbeddings.interpolate_pos_encoding``). Returns ``pos_embed`` itself when the grids agree.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)  # (1, E, Gh, Gw)
    grid = nn.functional.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)


class _Pooler(nn.Module):
    """``tanh(dense(x))`` on the pooled token (BERT/transformers ``ViTPooler``)."""

    def __init__(self, embed_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x))


class VisionTransformer(nn.Module):
    r"""Vision Transformer: patch tokens (+ class token) with learned positions through pre-norm encoder layers.

    Implements Dosovitskiy et al. 2021, Eq. 1-4: ``z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos``,
    ``z'_l = MSA(LN(z_{l-1})) + z_{l-1}``, ``z_l = MLP(LN(z'_l)) + z'_l`` (:class:`attnkit.nn.TransformerEncoderLayer`
    with ``norm_first=True`` and exact GELU), ``y = LN(z_L^0)``. :meth:`forward_features` returns the final
    normalised tokens ``LN(z_L)`` ``(B, 1 + N, E)`` (transformers' ``last_hidden_state``); :meth:`forward` pools
    them (class token, or mean of the patch tokens with ``pool="mean"``), applies the optional ``pooler``
    (``tanh(dense(.))``, transformers' ``ViTModel`` pooler) and the linear ``head``. Learned positions are
    interpolated (:func:`interpolate_pos_embed`) when the patch grid differs from the one of ``image_size``.

    :attr:`token_layout` (for capture tools) holds the last call's ``grid`` ``(Gh, Gw)``, ``num_prefix_tokens``
    (1 with a class token) and ``patch_size``; tokens after the prefix are patches in row-major order.

    Args:
        image_size: training image size ``Hi`` or ``(Hi, Wi)``, which sizes the position table; default 224.
        patch_size: ``P``; default 16.
        in_chans: image channels; default 3.
        num_classes: outputs of ``head``; 0 = no head. Default 1000.
        embed_dim: ``E``; default 768.
        depth: number of encoder layers; default 12.
        num_heads: ``H``; default 12.
        mlp_ratio: MLP hidden width / ``E``; default 4.0.
        class_token: prepend a learned class token; default ``True``.
        pool: ``"token"`` (class token; needs ``class_token``) or ``"mean"`` (mean of the patch tokens).
        pooler: add transformers' ``tanh(dense(.))`` pooler before the head; default ``False``.
        layer_norm_eps: LayerNorm epsilon; default 1e-6 (the reference JAX code; transformers uses 1e-12).
        drop_rate: dropout on embeddings and residual branches (training only).
        attn_drop: attention-probability dropout (training only).
        backend: :func:`attnkit.attention` backend; default ``"auto"``.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``x``: ``(B, in_chans, Hi', Wi')`` (any size of at least one patch) -> ``(B, num_classes)``, or the
        pooled ``(B, E)`` when ``num_classes == 0``.

    Raises:
        TypeError: non-int sizes; a non-tensor or non-floating input.
        ValueError: sizes below 1, ``E`` not a multiple of ``H``, an unknown ``pool``, ``pool="token"``
            without a class token; an input of the wrong rank, channels, or smaller than one patch.

    References:
        Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
        ICLR 2021, Eq. 1-4 and Sec. 3.2. Checkpoint layout and numerics match transformers' ``ViTModel`` /
        ``ViTForImageClassification`` (see :meth:`from_pretrained`).

    Example:
        >>> import torch
        >>> vit = VisionTransformer(image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
        >>> vit.forward_features(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 17, 64])
        >>> vit(torch.randn(2, 3, 48, 40)).shape  # positions interpolated to a 6x5 grid
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        image_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_token: bool = True,
        pool: str = "token",
        pooler: bool = False,
        layer_norm_eps: float = 1e-6,
        drop_rate: float = 0.0,
        attn_drop: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        owner = "VisionTransformer"
        image_size = to_pair(image_size, "image_size", owner)
        check_int(num_classes, "num_classes", owner, minimum=0)
        check_int(depth, "depth", owner)
        check_int(num_heads, "num_heads", owner)
        if pool not in _POOLS:
            raise ValueError(f"{owner}: pool must be one of {_POOLS}, got {pool!r}")
        if pool == "token" and not class_token:
            raise ValueError(f"{owner}: pool='token' needs class_token=True; use pool='mean' without a class token")
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"{owner}: expected mlp_ratio > 0, got {mlp_ratio!r}")
        dd = {"device": device, "dtype": dtype}
        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, **dd)
        self.image_size, self.grid_size = image_size, self.patch_embed.grid_size(image_size)
        if min(self.grid_size) < 1:
            raise ValueError(
                f"{owner}: image_size {image_size} is smaller than one patch {self.patch_embed.patch_size}"
            )
        self.num_prefix_tokens = 1 if class_token else 0
        self.num_classes, self.num_features, self.pool = num_classes, embed_dim, pool
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd)) if class_token else None
        num_pos = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.empty(1, num_pos, embed_dim, **dd))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = nn.ModuleList(
            TransformerEncoderLayer(
                embed_dim,
                num_heads,
                ffn_dim=round(embed_dim * mlp_ratio),
                dropout=drop_rate,
                attn_drop=attn_drop,
                activation="gelu",
                norm_first=True,
                layer_norm_eps=layer_norm_eps,
                backend=backend,
                **dd,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=layer_norm_eps, **dd)
        self.pooler = _Pooler(embed_dim, **dd) if pooler else None
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes else nn.Identity()
        #: Layout of the last forward call (see the class docstring).
        self.token_layout: dict[str, Any] = {}

    def _pos_embed(self, grid: tuple[int, int]) -> Tensor:
        prefix, patches = self.pos_embed[:, : self.num_prefix_tokens], self.pos_embed[:, self.num_prefix_tokens :]
        return torch.cat([prefix, interpolate_pos_embed(patches, self.grid_size, grid)], dim=1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Final normalised tokens ``(B, num_prefix_tokens + Gh·Gw, E)`` of images ``(B, C, Hi, Wi)``."""
        tokens = self.patch_embed(x)  # (B, N, E); validates x
        grid = self.patch_embed.grid_size(tuple(x.shape[-2:]))
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.pos_drop(tokens + self._pos_embed(grid))
        self.token_layout = {
            "grid": grid,
            "num_prefix_tokens": self.num_prefix_tokens,
            "patch_size": self.patch_embed.patch_size,
        }
        for block in self.blocks:
            tokens = block(tokens)
        return self.norm(tokens)

    def forward_head(self, features: Tensor, *, pre_logits: bool = False) -> Tensor:
        """Pool ``(B, 1 + N, E)`` features (class token or patch mean), apply the pooler, then the head."""
        pooled = features[:, 0] if self.pool == "token" else features[:, self.num_prefix_tokens :].mean(1)
        if self.pooler is not None:
            pooled = self.pooler(pooled)
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)``, or pooled features ``(B, E)`` when ``num_classes == 0``."""
        return self.forward_head(self.forward_features(x))

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        nonfinite: str = "warn",
    ) -> VisionTransformer:
        """Build a :class:`VisionTransformer` from a Hugging Face ViT checkpoint directory.

        Reads ``config.json`` and ``model.safetensors`` as written by ``ViTModel.save_pretrained`` or
        ``ViTForImageClassification.save_pretrained`` (safetensors only; pickle files are never read). The config
        is checked against the safetensors headers and the model built on the ``meta`` device before any memory
        is allocated. With a ``pooler.dense`` in the checkpoint ``model(x)`` equals ``ViTModel``'s
        ``pooler_output``; with a ``classifier`` it equals ``ViTForImageClassification``'s logits;
        ``forward_features`` equals ``last_hidden_state`` for every checkpoint. Inputs of another size than
        ``image_size`` get interpolated positions, as transformers' ``interpolate_pos_encoding=True``.

        Args:
            path: the checkpoint directory.
            backend: :func:`attnkit.attention` backend for every layer.
            device: where to put the model (default CPU).
            dtype: parameter dtype (default float32); floating checkpoint tensors are cast to it.
            nonfinite: weights holding NaN or inf: ``"warn"`` (default), ``"error"`` or ``"ignore"``.

        Returns:
            the model, in eval mode.

        Raises:
            FileNotFoundError, NotADirectoryError: no such directory, or no ``config.json`` / ``model.safetensors``.
            CheckpointError: (a ``ValueError``) a config that is not a ViT, uses options this model does not have
                or disagrees with the weights (see :func:`attnkit.vision.vit_hf.vit_kwargs`); unreadable files;
                tensors that are missing, unexpected or mis-shaped (all listed); non-finite weights with
                ``nonfinite="error"``.
            ImportError: ``safetensors`` is missing (``pip install attnkit[hf]``).
        """
        from attnkit.io.checkpoint import CheckpointError, load_from_header, read_config, read_header
        from attnkit.vision.vit_hf import hf_vit_key, vit_kwargs

        source = f"checkpoint {str(path)!r}"
        config = read_config(path)
        header = read_header(path)
        kwargs = vit_kwargs(config, header, source)
        try:
            model = cls(**kwargs, backend=backend, device="meta", dtype=dtype)
        except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: sizes overflowing even on meta
            raise CheckpointError(f"{source}: config.json describes an invalid model: {err}") from None
        load_from_header(model, path, header, hf_vit_key, device=device, nonfinite=nonfinite, source=source)
        return model.eval()
