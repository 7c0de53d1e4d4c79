"""Small real datasets for demos and tests (no downloads): cluttered handwritten digits, digit detection scenes,
Python's language reference as English text."""

from attnkit.datasets.digit_scenes import DigitScenes, collate_scenes
from attnkit.datasets.digits import SPLITS, DigitCanvases, load_scans, split_scans
from attnkit.datasets.language_reference import language_reference_text, language_reference_topics

__all__ = [
    "SPLITS",
    "DigitCanvases",
    "DigitScenes",
    "collate_scenes",
    "language_reference_text",
    "language_reference_topics",
    "load_scans",
    "split_scans",
]
