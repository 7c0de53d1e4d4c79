"""Small real datasets for demos and tests (no downloads): cluttered handwritten digits, digit detection scenes."""

from attnkit.datasets.digit_scenes import DigitScenes, collate_scenes
from attnkit.datasets.digits import SPLITS, DigitCanvases, load_scans, split_scans

__all__ = ["SPLITS", "DigitCanvases", "DigitScenes", "collate_scenes", "load_scans", "split_scans"]
