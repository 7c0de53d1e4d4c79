"""Does attention help my model? Ablations that train variants with and without attention under one budget and
report accuracy (mean ± std over seeds, paired significance), learning curves and convergence, parameters, MACs,
CPU latency, and the roll-out verdict.

``ablate`` (the user's own classifier, with attention inserted by :func:`attnkit.vision.insert_attention`),

``run_vision_ablation`` (attention blocks in a small ResNet, and a ViT, on images: the built-in cluttered digits,
an ImageFolder directory or an ``.npz``) and ``run_seq2seq_ablation`` (GRU encoder-decoder without attention, with
Bahdanau or Luong attention, and a Transformer, on date normalisation in several languages) return an
``AblationResult``; ``write_report`` writes its Markdown/CSV tables, plots and HTML section. The command line is
``attnkit ablate custom|vision|seq2seq``. Optional dependencies: babel (dates), scipy (significance), matplotlib
(plots), Pillow (image folders), scikit-learn (digits).
"""

from attnkit.ablation.convergence import History, best_epoch, has_plateaued
from attnkit.ablation.cost import count_macs, count_parameters, interleaved_latency
from attnkit.ablation.custom import CUSTOM_VARIANTS, Splits, ablate, load_arrays
from attnkit.ablation.dates import DateTask, make_date_task
from attnkit.ablation.images import DataError, ImageData, load_digits, load_image_data, load_image_folder, load_npz
from attnkit.ablation.report import write_report
from attnkit.ablation.results import AblationResult, Alignment, VariantResult
from attnkit.ablation.seq2seq import SEQ2SEQ_MODELS, GRUSeq2Seq, TransformerSeq2Seq, build_seq2seq
from attnkit.ablation.stats import Lift, mean_std, paired_lift
from attnkit.ablation.train import BUDGETS, TrainConfig, fit, init_distributed
from attnkit.ablation.translation import run_seq2seq_ablation
from attnkit.ablation.verdict import DEFAULT_THRESHOLD, VariantVerdict, Verdict, decide
from attnkit.ablation.vision import VISION_VARIANTS, build_vision_model, run_vision_ablation

__all__ = [
    "BUDGETS",
    "CUSTOM_VARIANTS",
    "DEFAULT_THRESHOLD",
    "SEQ2SEQ_MODELS",
    "VISION_VARIANTS",
    "AblationResult",
    "Alignment",
    "DataError",
    "DateTask",
    "GRUSeq2Seq",
    "History",
    "ImageData",
    "Lift",
    "Splits",
    "TrainConfig",
    "TransformerSeq2Seq",
    "VariantResult",
    "VariantVerdict",
    "Verdict",
    "ablate",
    "best_epoch",
    "build_seq2seq",
    "build_vision_model",
    "count_macs",
    "count_parameters",
    "decide",
    "fit",
    "has_plateaued",
    "init_distributed",
    "interleaved_latency",
    "load_arrays",
    "load_digits",
    "load_image_data",
    "load_image_folder",
    "load_npz",
    "make_date_task",
    "mean_std",
    "paired_lift",
    "run_seq2seq_ablation",
    "run_vision_ablation",
    "write_report",
]
