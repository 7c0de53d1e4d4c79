"""The shipped digit detectors side by side: COCO mAP on held-out scenes, pointing game of the per-detection maps,
and CPU latency per image at batch 1 and 16.

* accuracy: :func:`attnkit.vision.detection.evaluate.coco_map` (pycocotools) on ``DigitScenes("test", ...)`` (source
  scans never seen in training), 96x96 canvases and also 64 and 128;
* pointing game: for every RT-DETR detection scoring >= 0.5, does the peak of its map fall inside the detected box?
  Two maps: ``attention`` (last decoder layer's deformable sampling points weighted by attention, averaged over
  heads) and ``relevance`` (Chefer et al. 2021's R^{qi} row of the detection's query, gradient-weighted by its class
  logit). Also the share of the map's mass inside the box (the energy-based pointing game of Wang et al. 2020,
  Score-CAM, Sec. 5.2), the share of those detections whose box matches a ground-truth digit (IoU >= 0.5, same
  label), and the seconds per image each map takes;
* latency: median wall time of ``model(images)`` (eval, no_grad, post-processing included) over interleaved rounds,
  per image.

    python benchmarks/detection.py                     # full run (a few minutes on 2 idle cores)
    python benchmarks/detection.py --parts pointing    # one part: accuracy, pointing, latency (comma-separated)
    python benchmarks/detection.py --quick             # smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from attnkit.benchmark import interleaved_medians
from attnkit.datasets import DigitScenes
from attnkit.explain.detection_maps import box_masks, detection_maps
from attnkit.vision.detection import box_iou
from attnkit.vision.detection.evaluate import coco_map
from attnkit.vision.detection.pretrained import DETECTOR_NAMES, load_detector

PARTS = ("accuracy", "pointing", "latency")
EVAL_SEED = 777  # differs from the training script's held-out seed: fresh test scenes


def accuracy(models, num: int) -> list[list]:
    rows = []
    for size in (96, 64, 128):
        data = DigitScenes("test", num_canvases=num, seed=(EVAL_SEED, size), canvas_size=size)
        for name, model in models.items():
            with torch.no_grad():
                dets = [d for i in range(0, num, 32) for d in model(data.images[i : i + 32])]
            s = coco_map(dets, data.targets)
            rows.append([name, size, s["num_images"], s["num_objects"], s["map"], s["map_50"], s["map_75"]])
    return rows


def pointing(model, num: int, method: str, threshold: float = 0.5) -> dict:
    data = DigitScenes("test", num_canvases=num, seed=(EVAL_SEED, 1), canvas_size=96)
    hits, mass, correct, count = [], [], 0, 0
    start = time.perf_counter()
    for image, target in zip(data.images, data.targets):
        (res,) = detection_maps(model, image[None], score_threshold=threshold, method=method)
        hits.append(res.hits)
        det = res.detections
        if len(det):
            inside = (res.maps * box_masks(det.boxes, tuple(res.maps.shape[-2:]))).sum((1, 2))
            mass.append(inside / res.maps.sum((1, 2)).clamp_min(1e-12))
            iou = box_iou(det.boxes, target["boxes"])[0]
            same = det.labels[:, None] == target["labels"][None]
            correct += int(((iou >= 0.5) & same).any(1).sum())
            count += len(det)
    seconds = (time.perf_counter() - start) / num
    hits = torch.cat(hits)
    if count == 0:
        nan = float("nan")
        return {"detections": 0, "pointing_game": nan, "true_positive_share": nan, "mass_in_box": nan, "s": seconds}
    return {
        "detections": count,
        "pointing_game": float(hits.float().mean()),
        "true_positive_share": correct / count,
        "mass_in_box": float(torch.cat(mass).mean()),
        "s": seconds,
    }


def latency(models, rounds: int) -> list[list]:
    rows = []
    for batch in (1, 16):
        images = DigitScenes("test", num_canvases=batch, seed=(EVAL_SEED, 2), canvas_size=96).images
        fns = {name: (lambda m=m, x=images: m(x)) for name, m in models.items()}
        with torch.no_grad():
            med = interleaved_medians(fns, rounds=rounds, warmup=2)
        base = med["centernet"]
        for name in models:
            rows.append([name, batch, med[name] * 1e3 / batch, base / med[name]])
    return rows


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(PARTS)}, got {text!r}")
    return parts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--parts", type=_parts, default=PARTS, help=f"comma-separated parts to run (default all: {','.join(PARTS)})"
    )
    p.add_argument("--weights", default=None, help="directory with digit_detectors.json (default: the shipped one)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, python {platform.python_version()}, {args.threads} threads, load {os.getloadavg()}"
    )
    models = {name: load_detector(name, directory=args.weights) for name in DETECTOR_NAMES}
    num = 48 if args.quick else 300
    if "accuracy" in args.parts:
        print(
            "\n| model | canvas | images | objects | mAP@[.5:.95] | mAP@.5 | mAP@.75 |\n"
            "|---|---:|---:|---:|---:|---:|---:|"
        )
        for r in accuracy(models, num):
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} |")
    if "pointing" in args.parts:
        print(
            "\nRT-DETR per-detection maps, 96 px held-out scenes, detections scoring >= 0.5\n\n"
            "| map | scenes | detections | true positives | pointing game | mass in box | s per image |\n"
            "|---|---:|---:|---:|---:|---:|---:|"
        )
        scenes = 24 if args.quick else 200
        for method in ("attention", "relevance"):
            pg = pointing(models["rtdetr"], scenes, method)
            print(
                f"| {method} | {scenes} | {pg['detections']} | {pg['true_positive_share']:.3f} | "
                f"{pg['pointing_game']:.3f} | {pg['mass_in_box']:.3f} | {pg['s']:.3f} |"
            )
    if "latency" in args.parts:
        print("\n| model | batch | ms per image (median) | speed vs centernet |\n|---|---:|---:|---:|")
        for r in latency(models, 5 if args.quick else 30):
            print(f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f}x |")
    print(f"\nload at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
