"""Where did the model look? Capture attention from any model, and explain with it.

``capture`` records attention maps from attnkit modules, ``torch.nn.functional.scaled_dot_product_attention``
and ``nn.MultiheadAttention`` without changing the model's outputs; ``rollout``, ``attention_flow``,
``relevance`` and ``lrp`` (AttnLRP, CP-LRP; also down to the pixels of a ViT's convolutional stem) turn them
into token attributions; ``context_mixing`` weighs
attention by the values; ``generate_attribution`` explains each token a decoder generates, with the KV cache;
``heads`` and ``metrics`` diagnose heads and check faithfulness; ``evaluate`` scores methods on a task; ``plots``
and ``report`` draw them (matplotlib: ``pip install attnkit[explain]``).
"""

from attnkit.explain import plots
from attnkit.explain.capture import Recording, capture, capture_plan
from attnkit.explain.context_mixing import ContextMixing, attention_norms, value_zeroing
from attnkit.explain.evaluate import EvaluationTask, RandomizationResult, evaluate, randomization_check
from attnkit.explain.flow import attention_flow
from attnkit.explain.generation import GENERATION_METHODS, GenerationAttribution, generate_attribution
from attnkit.explain.heads import attention_distance, head_entropy, head_importance
from attnkit.explain.lrp import LRPResult, lrp
from attnkit.explain.metrics import (
    AOPCResult,
    CurveResult,
    alignment_error_rate,
    aopc,
    deletion,
    insertion,
    pointing_game,
    random_saliency,
)
from attnkit.explain.records import AttentionRecord, TokenLayout
from attnkit.explain.reducers import Entropy, HeadMean, Received, Reducer, Rollout, TopK
from attnkit.explain.relevance import Relevance, relevance
from attnkit.explain.report import HeadMaps, Section, report
from attnkit.explain.rollout import rollout

__all__ = [
    "GENERATION_METHODS",
    "AOPCResult",
    "AttentionRecord",
    "ContextMixing",
    "CurveResult",
    "Entropy",
    "EvaluationTask",
    "GenerationAttribution",
    "HeadMaps",
    "HeadMean",
    "LRPResult",
    "RandomizationResult",
    "Received",
    "Recording",
    "Reducer",
    "Relevance",
    "Rollout",
    "Section",
    "TokenLayout",
    "TopK",
    "alignment_error_rate",
    "aopc",
    "attention_distance",
    "attention_flow",
    "attention_norms",
    "capture",
    "capture_plan",
    "deletion",
    "evaluate",
    "generate_attribution",
    "head_entropy",
    "head_importance",
    "insertion",
    "lrp",
    "plots",
    "pointing_game",
    "random_saliency",
    "randomization_check",
    "relevance",
    "report",
    "rollout",
    "value_zeroing",
]
