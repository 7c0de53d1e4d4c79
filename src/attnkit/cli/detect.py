"""``attnkit detect``: boxes, labels and scores of the shipped digit detector (or trained weights), optionally
as JSON lines, and an HTML report of what each detection looked at."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import Tensor

from attnkit.cli.checks import check_out_file
from attnkit.cli.registry import UserError, subcommand

MIN_SIDE, MAX_SIDE = 16, 1024  # pixels per side the detector accepts
SHIPPED_SIDES = (64, 256)  # what the shipped digit detector was made for
SUFFIXES = (".png", ".jpg", ".jpeg", ".npy")
MAPS = ("attention", "relevance", "both")
_CAPTIONS = {
    "attention": "where its decoder query read the image: the deformable cross-attention sampling points of the "
    "last decoder layer, weighted by their attention and averaged over heads",
    "relevance": "the relevance of the image for its class score (Chefer et al. 2021's rules through every "
    "decoder layer's self- and cross-attention, gradient-weighted; deformable attention as its sampling "
    "weights splatted at the sampled cells)",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG, JPEG or .npy (2-d grey) files")
    parser.add_argument("--threshold", type=float, default=0.5, help="minimum score (default 0.5)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line and image")
    parser.add_argument("--out", type=Path, default=None, help="write an HTML report with per-detection maps here")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing report")
    parser.add_argument(
        "--maps",
        choices=MAPS,
        default=None,
        help="per-detection maps in the report: the query's cross-attention, its relevance (Chefer et al. 2021), "
        "or both (default; needs --out)",
    )
    parser.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="directory with digit_detectors.json and its weights (default: the shipped digit detector)",
    )


def _check_size(path: Path, height: int, width: int) -> None:
    if min(height, width) < MIN_SIDE or max(height, width) > MAX_SIDE:
        raise UserError(
            f"{path}: image of {width}x{height} pixels; expected {MIN_SIDE} to {MAX_SIDE} pixels per side "
            f"(the digit detector was trained on {SHIPPED_SIDES[0]}-{SHIPPED_SIDES[1]} px canvases)"
        )


def _read_npy(path: Path) -> Tensor:
    import numpy as np

    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UserError(f"{path}: not a readable .npy array ({exc})") from None
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):
        arr = arr.reshape([s for s in arr.shape if s != 1] or [1])
    if arr.ndim != 2 or arr.dtype.kind not in "uif":
        raise UserError(f"{path}: expected a 2-d numeric grey image, got shape {arr.shape} of {arr.dtype}")
    _check_size(path, *arr.shape)
    image = torch.from_numpy(np.array(arr, dtype=np.float32))
    if not torch.isfinite(image).all():
        raise UserError(f"{path}: the array holds NaN or infinite values")
    if arr.dtype == np.uint8:
        image = image / 255.0
    elif float(image.max()) > 1.0:
        image = image / float(image.max())  # e.g. load_digits' 0..16 grey levels
    return image.clamp_min(0.0)


def _read_picture(path: Path) -> Tensor:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise UserError("reading images needs Pillow: pip install 'attnkit[demo]'") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                width, height = im.size  # read from the header, before decoding any pixel
                _check_size(path, height, width)
                im = im.convert("L")
                pixels = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UserError(f"{path}: refused, the image is too large to decode safely ({exc})") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise UserError(f"{path}: not a readable PNG/JPEG image ({exc})") from None
    return pixels.reshape(height, width).float() / 255.0


def read_image(path: Path) -> Tensor:
    """``(1, Hi, Wi)`` float32 grey image in ``[0, 1]``, light digits on a dark background (light-background
    images are inverted, as ``load_digits`` shows ink as high values).

    Raises:
        UserError: a missing file, an unknown suffix, an unreadable file, or a size outside 16-1024 px per side
        (checked from the header before decoding: decompression bombs are refused).
    """
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f"{path}: unsupported file type {path.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    image = _read_npy(path) if path.suffix.lower() == ".npy" else _read_picture(path)
    if float(image.mean()) > 0.5:
        image = 1.0 - image
    return image[None]


def _load(weights: Path | None):
    from attnkit.vision.detection.pretrained import load_detector

    try:
        return load_detector("rtdetr", directory=weights)
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"--weights {weights}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold must be in [0, 1], got {args.threshold}")
    if args.maps is not None and args.out is None:
        raise UserError("--maps chooses the maps of the report: give --out too")
    check_out_file(args.out, overwrite=args.overwrite)
    images = [read_image(p) for p in args.images]  # every input checked before any work
    model = _load(args.weights)
    methods = [] if args.out is None else (["attention", "relevance"] if args.maps in (None, "both") else [args.maps])
    results = []
    for path, image in zip(args.images, images):
        maps = {}
        if methods:
            from attnkit.explain.detection_maps import detection_maps

            for method in methods:
                (maps[method],) = detection_maps(model, image[None], score_threshold=args.threshold, method=method)
            det = maps[methods[0]].detections
        else:
            with torch.no_grad():
                (det,) = model(image[None], score_threshold=args.threshold)
        results.append((path, image, det, maps))
        _print(path, det, as_json=args.json)
    if args.out is not None:
        _write(args, results)
    return 0


def _print(path: Path, det, *, as_json: bool) -> None:
    rows = [
        {"label": int(lab), "score": round(float(s), 4), "box": [round(float(v), 1) for v in box]}
        for box, s, lab in zip(det.boxes, det.scores, det.labels)
    ]
    if as_json:
        print(json.dumps({"image": str(path), "detections": rows}), flush=True)
        return
    print(f"{path}: {len(rows)} detection{'s' if len(rows) != 1 else ''}")
    for r in rows:
        x0, y0, x1, y1 = r["box"]
        print(f"  {r['label']}  score {r['score']:.3f}  box [{x0:.1f}, {y0:.1f}, {x1:.1f}, {y1:.1f}]")


def _write(args, results) -> None:
    from attnkit.cli.reports import write_report
    from attnkit.explain.detection_plots import detection_figure
    from attnkit.explain.report import Section

    sections = []
    for path, image, det, maps in results:
        figures, text, header = [], [], ["label", "score", "box (x0, y0, x1, y1)"]
        columns = []
        for method, res in maps.items():
            # the relevance run computes attention through explicit probabilities: its detections can differ from
            # the plain run's in the last digits, so each figure draws its own
            d = res.detections
            figures.append(detection_figure(image, d.boxes, d.labels, d.scores, maps=res.maps, hits=res.hits))
            rate = f"{float(res.hits.float().mean()):.0%}" if len(d) else "n/a"
            text.append(f"{method.capitalize()} panels: {_CAPTIONS[method]}. Peak inside the detected box: {rate}.")
            header.append(f"peak in box ({method})")
            keys = zip(d.queries.tolist(), d.labels.tolist())
            columns.append({k: "yes" if bool(h) else "no" for k, h in zip(keys, res.hits)})
        rows = [
            [int(lab), f"{float(s):.3f}", ", ".join(f"{float(v):.1f}" for v in box)]
            + [c.get((int(q), int(lab)), "-") for c in columns]  # matched by (query, label)
            for box, s, lab, q in zip(det.boxes, det.scores, det.labels, det.queries)
        ]
        sections.append(
            Section(
                f"{path.name}: {len(det)} detections",
                text="Each panel shows one detection. " + "\n\n".join(text),
                table=rows,
                table_header=header,
                figures=figures,
            )
        )
    out = write_report(args.out, sections, title="attnkit detect", overwrite=args.overwrite)
    print(f"report: {out}", file=sys.stderr if args.json else sys.stdout)


subcommand("detect", "detect handwritten digits on canvases and show what each detection looked at")(add_arguments, run)
