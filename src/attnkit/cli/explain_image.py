"""``attnkit explain-image``: where an image classifier looks, as heatmap overlays and an HTML report."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from torch import Tensor

from attnkit.cli.registry import UserError, subcommand

SHIPPED = {"digits-vit": "vit", "digits-cnn": "cnn"}
METHODS = {"vit": ("rollout", "relevance"), "cnn": ("cbam",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument(
        "--checkpoint",
        default="digits-vit",
        help="digits-vit | digits-cnn (shipped, trained on handwritten digits) or a Hugging Face ViT checkpoint "
        "directory (config.json + model.safetensors); default digits-vit",
    )
    parser.add_argument("--method", default=None, help="rollout | relevance (ViT) or cbam (CNN); default the first")
    parser.add_argument("--out", type=Path, default=None, help="write an HTML report here; overlays go next to it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report and overlays")


def _normalization(path: Path, channels: int) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per channel from ``preprocessor_config.json`` (transformers' defaults 0.5 without one)."""
    from attnkit.io import CheckpointError, read_json

    mean, std = [0.5] * channels, [0.5] * channels  # transformers' ViTImageProcessor defaults
    processor = path / "preprocessor_config.json"
    if not processor.exists():
        return mean, std
    pre = read_json(processor, what="preprocessor_config.json")
    out = []
    for key, default in (("image_mean", mean), ("image_std", std)):
        value = pre.get(key, default)
        value = [value] * channels if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        ok = isinstance(value, list) and len(value) == channels
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        if not ok or (key == "image_std" and min(value) <= 0):
            rule = "positive " if key == "image_std" else ""
            raise CheckpointError(
                f"{processor}: {key} must be a list of {channels} finite {rule}numbers, got {value!r:.80}"
            )
        out.append([float(v) for v in value])
    return out[0], out[1]


def load_classifier(checkpoint: str, *, nonfinite: str = "warn"):
    """``(model, kind, image_size, in_chans, normalize)`` for a shipped name or a Hugging Face ViT directory."""
    from attnkit.io import CheckpointError

    if checkpoint in SHIPPED:
        from attnkit.models.digits import load_model

        kind = SHIPPED[checkpoint]
        try:
            model = load_model(kind, nonfinite=nonfinite)
        except (FileNotFoundError, CheckpointError) as exc:
            raise UserError(f"--checkpoint {checkpoint}: {exc}") from None
        return model, kind, 64, 1, None
    path = Path(checkpoint)
    if not path.is_dir() or not (path / "config.json").exists():
        valid = ", ".join(SHIPPED)
        raise UserError(f"--checkpoint {checkpoint}: not {valid}, nor a checkpoint directory with config.json")
    from attnkit.vision import VisionTransformer

    try:
        model = VisionTransformer.from_pretrained(path, nonfinite=nonfinite).eval()
        channels = model.patch_embed.in_chans
        normalize = _normalization(path, channels)
    except (CheckpointError, OSError) as exc:
        raise UserError(f"--checkpoint {checkpoint}: {exc}") from None
    if model.image_size[0] != model.image_size[1]:
        raise UserError(f"--checkpoint {checkpoint}: only square image_size is supported, got {model.image_size}")
    return model, "vit", model.image_size[0], channels, normalize


def read_image(path: Path, size: int, channels: int) -> Tensor:
    """``(channels, size, size)`` float32 in ``[0, 1]``; digits-style grey images are inverted to ink on black."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading images needs Pillow: pip install 'attnkit[demo]'") from None
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            pixels = torch.tensor(list(im.getdata()), dtype=torch.float32) / 255.0
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable PNG/JPEG image ({exc})") from None
    image = pixels.reshape(size, size, channels).permute(2, 0, 1)
    if channels == 1 and float(image.mean()) > 0.5:  # dark ink on white paper -> the training convention
        image = 1.0 - image
    return image


def run(args: argparse.Namespace) -> int:
    from attnkit.datasets.digits_eval import saliency

    model, kind, size, channels, normalize = load_classifier(args.checkpoint)
    method = args.method or METHODS[kind][0]
    if method not in METHODS[kind]:
        raise UserError(f"--method for {args.checkpoint} must be one of {', '.join(METHODS[kind])}, got {method!r}")
    if args.out is not None and args.out.exists() and not args.overwrite:
        raise UserError(f"{args.out} exists; pass --overwrite to replace it")
    images = torch.stack([read_image(p, size, channels) for p in args.images])
    inputs = images
    if normalize is not None:
        mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in normalize)
        inputs = (images - mean) / std
    with torch.no_grad():
        logits = model(inputs)
    logits = logits if isinstance(logits, Tensor) else logits[0]
    probs = logits.softmax(-1)
    conf, pred = probs.max(-1)
    maps = saliency(method, model, inputs)  # (B, size, size)
    for path, p, c, m in zip(args.images, pred.tolist(), conf.tolist(), maps):
        peak = int(m.argmax())
        print(f"{path}: class {p} ({c:.1%}); {method} peak at (x={peak % size}, y={peak // size})")
    if args.out is not None:
        _write(args, images, maps, pred, conf, method)
    return 0


def _write(args, images: Tensor, maps: Tensor, pred: Tensor, conf: Tensor, method: str) -> None:
    from attnkit.cli.reports import write_report
    from attnkit.explain import plots
    from attnkit.explain.report import Section

    files = args.out.with_name(args.out.stem + "_files")
    files.mkdir(parents=True, exist_ok=True)
    figures = []
    for i, path in enumerate(args.images):
        title = f"{path.name}: class {int(pred[i])} ({float(conf[i]):.0%})"
        fig = plots.image_overlays(images[i : i + 1], maps[i : i + 1], titles=[title], ncols=1)
        try:
            plots.save_figure(fig, files / f"{path.stem}_{method}.png", overwrite=args.overwrite)
        except FileExistsError:
            raise UserError(f"{files / (path.stem + '_' + method + '.png')} exists; pass --overwrite") from None
        figures.append(fig)
    rows = [[p.name, int(pred[i]), f"{float(conf[i]):.1%}"] for i, p in enumerate(args.images)]
    section = Section(
        f"Where the model looks ({method})",
        text=f"Checkpoint: {args.checkpoint}. Overlays are also saved as PNG files in {files.name}/.",
        table=rows,
        table_header=["image", "predicted class", "confidence"],
        figures=figures,
    )
    write_report(args.out, [section], title="attnkit explain-image", overwrite=args.overwrite)
    print(f"\nreport: {args.out}  (overlays in {files})")


subcommand("explain-image", "show where an image classifier looks (shipped digit models or a ViT checkpoint)")(
    add_arguments, run
)
