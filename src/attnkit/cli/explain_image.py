"""``attnkit explain-image``: where an image classifier looks, as heatmap overlays and an HTML report."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from attnkit.cli.checks import add_strict, check_out_file, nonfinite_policy
from attnkit.cli.registry import UserError, subcommand

SHIPPED = {"digits-vit": "vit", "digits-cnn": "cnn"}
METHODS = {"vit": ("rollout", "relevance", "attnlrp", "cp-lrp", "attnlrp-pixels", "cp-lrp-pixels"), "cnn": ("cbam",)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    parser.add_argument(
        "--checkpoint",
        default="digits-vit",
        help="digits-vit | digits-cnn (shipped, trained on handwritten digits) or a Hugging Face ViT checkpoint "
        "directory (config.json + model.safetensors); default digits-vit",
    )
    parser.add_argument(
        "--method",
        default=None,
        help="rollout | relevance | attnlrp | cp-lrp | attnlrp-pixels | cp-lrp-pixels (ViT) or cbam (CNN); default "
        "the first",
    )
    parser.add_argument("--out", type=Path, default=None, help="write an HTML report here; overlays go next to it")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report and overlays")
    add_strict(parser)


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
        from attnkit.vision.digits import load_model

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
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file (a directory, FIFO or device); pass a PNG or JPEG file")
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB").resize((size, size), Image.BILINEAR)
            pixels = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()) / 255.0
    except Image.DecompressionBombError as exc:
        raise UserError(f"{path}: refused, too many pixels for an image ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable PNG/JPEG image ({exc})") from None
    image = pixels.reshape(size, size, channels).permute(2, 0, 1)
    if channels == 1 and float(image.mean()) > 0.5:  # dark ink on white paper -> the training convention
        image = 1.0 - image
    return image


def overlay_names(images: list[Path], method: str) -> list[str]:
    """One overlay file name per input, unique even when inputs share a name (``a/x.png``, ``b/x.png``)."""
    width = len(str(len(images)))
    return [f"{i:0{width}d}_{p.stem}_{method}.png" for i, p in enumerate(images, 1)]


def _planned(args: argparse.Namespace, method: str) -> tuple[Path, list[Path]]:
    """The overlay folder and files ``--out`` will write, checked before any work."""
    check_out_file(args.out, overwrite=args.overwrite)
    files = args.out.with_name(args.out.stem + "_files")
    if files.exists() and not files.is_dir():
        raise UserError(f"{files} exists and is not a folder; remove it or choose another --out")
    overlays = [files / name for name in overlay_names(args.images, method)]
    if files.is_dir():
        for path in overlays:
            check_out_file(path, overwrite=args.overwrite)
    return files, overlays


def run(args: argparse.Namespace) -> int:
    from attnkit.explain.saliency import saliency

    if args.out is not None:  # cheap checks first: no model is loaded for a run that cannot write
        check_out_file(args.out, overwrite=args.overwrite)
    model, kind, size, channels, normalize = load_classifier(args.checkpoint, nonfinite=nonfinite_policy(args))
    method = args.method or METHODS[kind][0]
    if method not in METHODS[kind]:
        raise UserError(f"--method for {args.checkpoint} must be one of {', '.join(METHODS[kind])}, got {method!r}")
    planned = _planned(args, method) if args.out is not None else None
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
    if planned is not None:
        _write(args, planned, images, maps, pred, conf, method)
    return 0


def _write(args, planned, images: Tensor, maps: Tensor, pred: Tensor, conf: Tensor, method: str) -> None:
    """Overlays and the report; a failure removes every file and folder this run created."""
    from attnkit.cli.reports import write_report
    from attnkit.explain import plots
    from attnkit.explain.report import Section
    from attnkit.io.atomic import OutputTracker

    files, overlays = planned
    with OutputTracker() as created:
        created.mkdir(files)
        figures = []
        for i, (path, target) in enumerate(zip(args.images, overlays)):
            title = f"{path.name}: class {int(pred[i])} ({float(conf[i]):.0%})"
            fig = plots.image_overlays(images[i : i + 1], maps[i : i + 1], titles=[title], ncols=1)
            existed = target.exists()  # a replaced file (--overwrite) is not ours to remove on failure
            try:
                saved = plots.save_figure(fig, target, overwrite=args.overwrite)
                if not existed:
                    created.add(saved)
            except FileExistsError:
                raise UserError(f"{target} exists; pass --overwrite to replace it") from None
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
