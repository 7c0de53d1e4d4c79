"""The vision ablation: one small ResNet trained with each attention block (or none), plus a ViT, same budget.

Backbone (every CNN variant): :class:`attnkit.vision.HybridResNet` with ``widths=(16, 32, 64, 128)``, one
basic block per stage, a stride-2 stem (a 64x64 input gives 32, 16, 8 and 4 pixel maps). Variants:

* ``none``: no attention (the baseline);
* ``se``, ``eca``, ``cbam``: the channel(/spatial) block on the residual branch of every block, where the papers
  put it (Hu et al. 2018; Wang et al. 2020; Woo et al. 2018); ``reduction=8`` for SE and CBAM (16 would leave one
  hidden unit at 16 channels);
* ``nonlocal``: a non-local block (Wang et al. 2018, embedded Gaussian) after the residual branch of the blocks of
  the two middle stages (16x16 and 8x8 maps; the paper adds them to res3/res4);
* ``single_head``: one single-head self-attention layer (pre-norm, zero-initialised residual gate, no position
  encoding; the block of :func:`attnkit.vision.insert_attention`) after the third stage (8x8 map of 64 channels
  for a 64x64 input): the seed experiment's "add one attention layer";
* ``mhsa``: BoTNet (Srinivas et al. 2021): multi-head self-attention with relative positions replaces the 3x3
  convolution of the last stage;
* ``vit``: a small Vision Transformer (Dosovitskiy et al. 2021) instead of the CNN: patches of 1/8 of the image
  side, ``E=64``, 4 layers, 4 heads, MLP ratio 2.

Every variant gets the same :class:`~attnkit.ablation.train.TrainConfig` (AdamW, one-cycle, epochs, batch), the same
training batches and the same augmentation draws for a seed (random translation by up to ``max_shift`` pixels,
zero fill).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.ablation.cost import count_macs, count_parameters, interleaved_latency
from attnkit.ablation.images import ImageData, stratified_split
from attnkit.ablation.results import AblationResult, VariantResult
from attnkit.ablation.train import TrainConfig, fit, is_main_process, predict, run_summary, seeded

__all__ = ["VISION_VARIANTS", "build_vision_model", "random_translate", "run_vision_ablation"]

#: Variant names, in report order.
VISION_VARIANTS = ("none", "se", "eca", "cbam", "nonlocal", "single_head", "mhsa", "vit")
WIDTHS = (16, 32, 64, 128)

_DESCRIPTIONS = {
    "none": "HybridResNet (widths 16-32-64-128, 1 block/stage, stride-2 stem), no attention",
    "se": "same ResNet + squeeze-and-excitation (r=8) in every block (Hu et al. 2018)",
    "eca": "same ResNet + ECA (adaptive kernel) in every block (Wang et al. 2020)",
    "cbam": "same ResNet + CBAM (r=8, channel then spatial) in every block (Woo et al. 2018)",
    "nonlocal": "same ResNet + non-local block in the blocks of stages 2-3 (Wang et al. 2018)",
    "single_head": "same ResNet + one single-head self-attention layer after stage 3 (8x8 map; insert_attention)",
    "mhsa": "same ResNet, last stage's 3x3 conv replaced by MHSA with relative positions "
    "(BoTNet, Srinivas et al. 2021)",
    "vit": "Vision Transformer instead of the CNN: patch = side/8, E=64, 4 layers, 4 heads, MLP x2 "
    "(Dosovitskiy et al. 2021)",
}


def build_vision_model(name: str, *, in_chans: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    """The variant ``name`` of :data:`VISION_VARIANTS` for ``(in_chans, *image_size)`` images.

    Raises:
        ValueError: an unknown name (the valid ones are listed).
    """
    from attnkit.vision import HybridResNet, VisionTransformer, create_attention

    common = {"in_chans": in_chans, "num_classes": num_classes, "widths": WIDTHS, "stem_stride": 2}
    if name in ("none", "se", "eca", "cbam"):
        kwargs = {"reduction": 8} if name in ("se", "cbam") else None
        return HybridResNet(attention=None if name == "none" else name, attention_kwargs=kwargs, **common)
    if name == "nonlocal":
        net = HybridResNet(**common)
        for stage in (1, 2):
            for block in net.stages[stage]:
                block.attn = create_attention("nonlocal", WIDTHS[stage])
        return net
    if name == "single_head":
        from attnkit.vision import insert_attention

        example = torch.zeros(1, in_chans, *image_size)
        return insert_attention(HybridResNet(**common), "self_attention", where="stages.2", example_input=example)[0]
    if name == "mhsa":
        side = max(image_size) // 16 + 1  # last-stage map side after four stride-2 steps
        return HybridResNet(mhsa_last_stage=True, mhsa_kwargs={"num_heads": 4, "max_size": max(side, 2)}, **common)
    if name == "vit":
        patch = max(1, min(image_size) // 8)
        return VisionTransformer(
            image_size=image_size,
            patch_size=patch,
            in_chans=in_chans,
            num_classes=num_classes,
            embed_dim=64,
            depth=4,
            num_heads=4,
            mlp_ratio=2.0,
        )
    raise ValueError(f"build_vision_model: unknown variant {name!r}; valid: {', '.join(VISION_VARIANTS)}")


def random_translate(images: Tensor, generator: torch.Generator, max_shift: int) -> Tensor:
    """Shift every image of ``(B, C, H, W)`` by its own random ``(dy, dx)`` in ``[-max_shift, max_shift]``, filling
    with 0 (the background of the digits task)."""
    if max_shift <= 0:
        return images
    b, _, h, w = images.shape
    padded = F.pad(images, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(offsets)])


def run_vision_ablation(
    train: ImageData,
    test: ImageData,
    *,
    val: ImageData | None = None,
    variants: Sequence[str] = VISION_VARIANTS,
    seeds: Sequence[int] = (0, 1, 2),
    config: TrainConfig | None = None,
    max_shift: int = 4,
    latency_batches: Sequence[int] = (1, 64),
    latency_rounds: int = 20,
    progress: Callable[[str], None] | None = None,
) -> AblationResult | None:
    """Train every variant with every seed under one budget; measure accuracy and costs.

    Args:
        train: training images and labels.
        test: held-out images (never trained on, never used for early stopping or model selection).
        val: validation images for the learning curves, convergence and early stopping; default: 15% of
            ``train`` per class (stratified, seed 0), removed from the training images.
        variants: names from :data:`VISION_VARIANTS`; ``"none"`` is the baseline of the lifts when present.
        seeds: one run per seed and variant; the seed fixes the initialisation, batch order and augmentation.
        config: the budget (its ``seed`` field is replaced by each seed); default ``TrainConfig()``.
        max_shift: random translation in pixels (0 = no augmentation).
        latency_batches: batch sizes timed (random inputs of the data's shape).
        latency_rounds: interleaved rounds per batch size (median reported).
        progress: called with one line of text per finished run.

    Returns:
        an :class:`AblationResult` on the main process, ``None`` on the other ranks of a distributed run.

    Raises:
        ValueError: an unknown variant, no seed, or train and test images of different shapes.
    """
    unknown = [v for v in variants if v not in VISION_VARIANTS]
    if unknown or not variants:
        raise ValueError(f"run_vision_ablation: unknown variants {unknown}; valid: {', '.join(VISION_VARIANTS)}")
    if not seeds:
        raise ValueError("run_vision_ablation: expected at least one seed")
    if train.images.shape[1:] != test.images.shape[1:]:
        raise ValueError(
            f"run_vision_ablation: train images {tuple(train.images.shape[1:])} and test images "
            f"{tuple(test.images.shape[1:])} differ in shape"
        )
    config = config or TrainConfig()
    start = time.perf_counter()
    if val is None:
        train_idx, val_idx = stratified_split(train.labels, test_fraction=0.15, seed=0)
        train, val = train.subset(train_idx), train.subset(val_idx)
    in_chans, height, width = train.images.shape[1:]
    num_classes = len(train.classes)

    def build(name: str) -> nn.Module:
        return build_vision_model(name, in_chans=in_chans, num_classes=num_classes, image_size=(height, width))

    def loss_fn(model: nn.Module, batch: list[Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def augment(batch: list[Tensor], generator: torch.Generator) -> list[Tensor]:
        return [random_translate(batch[0], generator, max_shift), batch[1]]

    def validate(model: nn.Module) -> float:
        return float((predict(model, [val.images]).argmax(-1) == val.labels).float().mean())

    results = {name: VariantResult(name, [], description=_DESCRIPTIONS[name]) for name in variants}
    first_models: dict[str, nn.Module] = {}
    for seed in seeds:
        run_config = TrainConfig(**{**config.__dict__, "seed": seed})
        for name in variants:
            t0 = time.perf_counter()
            model = seeded(lambda name=name: build(name), seed)
            history = fit(model, [train.images, train.labels], loss_fn, run_config, augment=augment, validate=validate)
            if not is_main_process():
                continue
            logits = predict(model, [test.images])
            accuracy = float((logits.argmax(-1) == test.labels).float().mean())
            results[name].scores.append(accuracy)
            results[name].runs.append(history)
            first_models.setdefault(name, model)
            if progress is not None:
                progress(f"{name} seed {seed}: accuracy {100 * accuracy:.2f}%, {run_summary(history)} "
                         f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    if not is_main_process():
        return None
    for name, model in first_models.items():
        results[name].params = count_parameters(model)
        results[name].macs = count_macs(lambda model=model: model(test.images[:1]))
    for batch in latency_batches:
        x = torch.rand(batch, in_chans, height, width, generator=torch.Generator().manual_seed(batch))
        medians = interleaved_latency(
            {name: (lambda model=model, x=x: model(x)) for name, model in first_models.items()}, rounds=latency_rounds
        )
        for name, seconds in medians.items():
            results[name].latency[batch] = seconds
    return AblationResult(
        task="vision",
        title=f"{train.source}: {len(train.labels)} train / {len(val.labels)} validation / {len(test.labels)} test "
        f"images, {in_chans}x{height}x{width}, {num_classes} classes",
        baseline="none",
        seeds=list(seeds),
        variants=[results[name] for name in variants],
        budget={**config.describe(), "augmentation": f"random shift ±{max_shift} px"},
        wall_time_s=time.perf_counter() - start,
    )
