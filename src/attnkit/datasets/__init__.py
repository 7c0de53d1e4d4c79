"""Small real datasets for demos and tests (no downloads): cluttered handwritten digits."""

from attnkit.datasets.digits import SPLITS, DigitCanvases, load_scans, split_scans

__all__ = ["SPLITS", "DigitCanvases", "load_scans", "split_scans"]
