"""Package data: the shipped model weights (digit classifiers, digit detectors, the character decoder) and their
training metadata; see attnkit.vision.digits, attnkit.vision.detection.pretrained and attnkit.models.char_decoder."""

from pathlib import Path

__all__ = ["DATA_DIR"]

#: The directory of the shipped weights and their metadata JSON files.
DATA_DIR = Path(__file__).resolve().parent
