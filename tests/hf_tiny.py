"""Tiny random Hugging Face models (built from transformers' config classes, no downloads) and their inputs.

``initializer_range=1.0`` makes attention maps far from uniform, so a dropped or misaligned mask changes the
output by O(1) (with HF's default 0.02 the maps are nearly uniform and a wrong mask passes unnoticed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers as tf

INIT = 1.0
VOCAB = 97


def eager_softmax_in_float64(monkeypatch) -> None:
    """Make transformers' eager attention a float64 reference: it upcasts scores to float32 for the softmax, which
    in a float64 model loses precision and turns a padded row's float64 minimum into -inf (NaN rows)."""
    softmax = torch.nn.functional.softmax

    def softmax64(x, dim=None, _stacklevel=3, dtype=None):
        return softmax(x, dim=dim, dtype=torch.float64 if x.dtype == torch.float64 else dtype)

    monkeypatch.setattr(torch.nn.functional, "softmax", softmax64)


@dataclass
class Case:
    """One architecture: ``build()`` a model in eval mode, ``inputs()`` a batch, ``real`` = (B, L) real query rows
    of the output compared (``None``: all), ``outputs(out)`` the tensors compared."""

    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    real: Callable[[dict], torch.Tensor | None]
    outputs: Callable[[object], list[torch.Tensor]]


def _ids(b=2, n=11, left=3, right=2):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if left:
        mask[0, :left] = 0  # left padding
    if right:
        mask[1, n - right :] = 0  # right padding
    return {"input_ids": ids, "attention_mask": mask}


def _decoder(cls, cfg_cls, **cfg):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=INIT,
        pad_token_id=0,
    )
    base.update(cfg)
    return lambda: _seeded(cls, cfg_cls(**base))


def _seeded(cls, cfg):
    torch.manual_seed(0)
    return cls(cfg).eval()


def _last(out):
    return [out.last_hidden_state]


def _mask_rows(inputs):
    return inputs["attention_mask"].bool()


def llama(**cfg):
    return _decoder(tf.LlamaModel, tf.LlamaConfig, **cfg)


def mistral(**cfg):
    return _decoder(tf.MistralModel, tf.MistralConfig, sliding_window=4, **cfg)


def qwen2(**cfg):
    return _decoder(
        tf.Qwen2Model,
        tf.Qwen2Config,
        num_hidden_layers=3,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        **cfg,
    )


def gemma2(**cfg):
    return _decoder(
        tf.Gemma2Model,
        tf.Gemma2Config,
        head_dim=16,
        sliding_window=4,
        attn_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
        **cfg,
    )


def gpt_oss(**cfg):
    return _decoder(
        tf.GptOssModel,
        tf.GptOssConfig,
        head_dim=16,
        sliding_window=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["sliding_attention", "full_attention"],
        experts_implementation="eager",  # the grouped_mm experts kernel has no float64
        **cfg,
    )


DECODERS = {"llama": llama, "mistral": mistral, "qwen2": qwen2, "gemma2": gemma2, "gpt_oss": gpt_oss}
CAUSAL_LM = {
    "llama": (tf.LlamaForCausalLM, tf.LlamaConfig),
    "mistral": (tf.MistralForCausalLM, tf.MistralConfig),
    "qwen2": (tf.Qwen2ForCausalLM, tf.Qwen2Config),
    "gemma2": (tf.Gemma2ForCausalLM, tf.Gemma2Config),
    "gpt_oss": (tf.GptOssForCausalLM, tf.GptOssConfig),
}


def causal_lm(name: str) -> torch.nn.Module:
    """The ``*ForCausalLM`` variant of a decoder case (same config)."""
    model = DECODERS[name]()()
    lm_cls, _ = CAUSAL_LM[name]
    cfg = model.config
    return _seeded(lm_cls, cfg)


def _gpt2():
    cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=INIT)
    return _seeded(tf.GPT2Model, cfg)


def _bert():
    cfg = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        initializer_range=INIT,
    )
    return _seeded(tf.BertModel, cfg)


def _vit():
    cfg = tf.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        initializer_range=INIT,
    )
    return _seeded(tf.ViTModel, cfg)


def _pixels(b=2, size=32, channels=3):
    return torch.randn(b, channels, size, size, generator=torch.Generator().manual_seed(2))


def _clip():
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
        initializer_range=INIT,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        initializer_range=INIT,
    )
    cfg = tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32, initializer_range=INIT)
    return _seeded(tf.CLIPModel, cfg)


def _clip_inputs():
    batch = _ids(left=0)
    return {**batch, "pixel_values": _pixels()}


def _bart():
    cfg = tf.BartConfig(
        vocab_size=VOCAB,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_position_embeddings=64,
        init_std=INIT,
    )
    return _seeded(tf.BartModel, cfg)


def _seq2seq_inputs():
    batch = _ids(left=0)
    dec = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    return {**batch, "decoder_input_ids": dec}


def _t5():
    cfg = tf.T5Config(
        vocab_size=VOCAB,
        d_model=64,
        d_kv=16,
        d_ff=96,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        initializer_factor=INIT,
        decoder_start_token_id=0,
    )
    return _seeded(tf.T5Model, cfg)


def _whisper():
    cfg = tf.WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=96,
        decoder_ffn_dim=96,
        max_source_positions=16,
        max_target_positions=32,
        init_std=INIT,
        pad_token_id=0,
        decoder_start_token_id=1,
    )
    return _seeded(tf.WhisperModel, cfg)


def _whisper_inputs():
    feats = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(4))
    dec = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    return {"input_features": feats, "decoder_input_ids": dec}


def _detr():
    backbone = tf.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", out_features=["stage2"]
    )
    cfg = tf.DetrConfig(
        use_timm_backbone=False,
        backbone_config=backbone,
        use_pretrained_backbone=False,
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        num_queries=5,
        init_std=INIT,
    )
    return _seeded(tf.DetrModel, cfg)


def _detr_inputs():
    pixels = _pixels(size=64)
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    mask[1, :, 40:] = 0  # padded image
    return {"pixel_values": pixels, "pixel_mask": mask}


def _seq2seq_outputs(out):
    return [out.encoder_last_hidden_state, out.last_hidden_state]


def _all(_):
    return None


CASES = [
    *(Case(n, f(), _ids, _mask_rows, _last) for n, f in DECODERS.items()),
    Case("gpt2", _gpt2, _ids, _mask_rows, _last),
    Case("bert", _bert, lambda: _ids(left=0), _mask_rows, _last),
    Case("vit", _vit, lambda: {"pixel_values": _pixels()}, _all, _last),
    Case(
        "clip",
        _clip,
        _clip_inputs,
        _all,
        lambda out: [out.text_model_output.pooler_output, out.vision_model_output.last_hidden_state],
    ),
    Case("bart", _bart, _seq2seq_inputs, _all, _seq2seq_outputs),
    Case("t5", _t5, _seq2seq_inputs, _all, _seq2seq_outputs),
    Case("whisper", _whisper, _whisper_inputs, _all, _seq2seq_outputs),
    Case("detr", _detr, _detr_inputs, _all, lambda out: [out.encoder_last_hidden_state, out.last_hidden_state]),
]
