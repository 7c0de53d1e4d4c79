"""The detection part of ``attnkit demo``: the shipped digit detectors on held-out scenes, and what each detection
looked at."""

from __future__ import annotations

import torch


def detection_part(fast: bool):
    """Sections and summary rows for the shipped RT-DETR-style digit detector and its CenterNet baseline."""
    from attnkit.datasets import DigitScenes
    from attnkit.explain.detection_maps import detection_maps
    from attnkit.explain.detection_plots import detection_figure
    from attnkit.explain.report import Section
    from attnkit.vision.detection.evaluate import coco_map
    from attnkit.vision.detection.pretrained import load_detector, load_detector_metadata

    title = "Detection: where each detection looked"
    try:
        meta = load_detector_metadata()
        models = {name: load_detector(name) for name in meta.get("models", {})}
    except (FileNotFoundError, RuntimeError) as exc:
        text = f"The trained digit detectors are missing ({exc}). Train them with: python scripts/train_detector.py"
        return [Section(title, text=text)], [("detection", "shipped digit detectors", "missing", "train them")]
    data = DigitScenes("test", num_canvases=24 if fast else 64, seed=(2024, 96))
    rows, scores = [], {}
    for name, model in models.items():
        with torch.no_grad():
            s = coco_map(model(data.images), data.targets)
        entry = meta["models"][name]
        scores[name] = s
        rows.append(
            [
                name,
                f"{s['map_50']:.3f}",
                f"{s['map']:.3f}",
                f"{entry.get('training_seconds', 0):.0f} s",
                entry.get("parameters", ""),
            ]
        )
    figures, hits, rel_hits = [], [], []
    num_relevance = 8  # one forward and a backward per detection: kept to a few scenes
    if "rtdetr" in models:
        mapped = data.images[: 8 if fast else len(data)]  # one capture per scene: the slow part
        results = detection_maps(models["rtdetr"], mapped, score_threshold=0.5)
        hits = torch.cat([r.hits for r in results])
        for image, res in list(zip(data.images, results))[:2]:
            det = res.detections
            figures.append(detection_figure(image, det.boxes, det.labels, det.scores, maps=res.maps, hits=res.hits))
        relevant = detection_maps(
            models["rtdetr"], data.images[:num_relevance], score_threshold=0.5, method="relevance"
        )
        rel_hits = torch.cat([r.hits for r in relevant])
        det = relevant[0].detections
        figures.append(
            detection_figure(
                data.images[0], det.boxes, det.labels, det.scores, maps=relevant[0].maps, hits=relevant[0].hits
            )
        )
    point = float(hits.float().mean()) if len(hits) else float("nan")
    rel_point = float(rel_hits.float().mean()) if len(rel_hits) else float("nan")
    num_mapped = 8 if fast else len(data)
    text = (
        "Canvases of 2-5 real handwritten digits (scikit-learn's load_digits, 12-28 px tall, overlapping, among "
        "fragments of other digits); test scenes use scans never seen in training. RT-DETR: a compact RT-DETR-style "
        "transformer detector (hybrid encoder, top-k query selection, decoder with multi-scale deformable "
        "cross-attention); CenterNet: a convolutional anchor-free detector on the same backbone, trained under the "
        "same budget by scripts/train_detector.py. COCO mAP by pycocotools. Panels: each detection's decoder query, "
        "its deformable sampling points weighted by attention (last decoder layer, heads averaged); pointing game "
        f"= share of detections (score >= 0.5, first {num_mapped} scenes) whose map peaks inside the detected box: "
        f"{point:.2f}. The last panels: the relevance of the image for each detection of the first scene (Chefer et "
        "al. 2021's rules through every decoder layer, gradient-weighted by the class logit); its pointing game on "
        f"the first {num_relevance} scenes: {rel_point:.2f}. "
        f"{len(data)} test scenes. `attnkit detect IMAGE --out report.html` draws the same for your images."
    )
    section = Section(
        title,
        text=text,
        table=rows,
        table_header=["detector", "mAP@.5", "mAP@[.5:.95]", "training", "parameters"],
        figures=figures,
    )
    summary = []
    if "rtdetr" in scores:
        r = scores["rtdetr"]
        base = scores.get("centernet")
        summary.append(
            (
                "detection",
                "RT-DETR mAP@.5 / mAP; pointing game attention / relevance",
                f"{r['map_50']:.3f} / {r['map']:.3f}; {point:.2f} / {rel_point:.2f}",
                f"CenterNet {base['map_50']:.3f} / {base['map']:.3f}" if base else "",
            )
        )
    return [section], summary
