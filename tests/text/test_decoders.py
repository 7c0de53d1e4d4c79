"""Decoder-only checkpoints (Llama, Mistral, Qwen2, Gemma 2, gpt-oss) in attnkit.text and explain-text: they run
on attn_implementation="attnkit", capture records their causal maps, and those equal transformers' eager ones."""

import pytest
import torch
import transformers as tf

from attnkit.cli.main import main
from attnkit.text import capture_maps, load_text_model, token_scores
from hf_tiny import eager_softmax_in_float64

WORDS = ["<|endoftext|>", "the", "a", "cat", "dog", "sat", "on", "mat", "river", "bank", "cash", "i", "deposited", "at"]
TEXTS = ["i deposited cash at the bank", "the cat sat"]

SMALL = dict(
    vocab_size=len(WORDS),
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    initializer_range=1.0,
)
FAMILIES = {
    "llama": (tf.LlamaConfig, tf.LlamaModel, {}),
    "mistral": (tf.MistralConfig, tf.MistralModel, {"sliding_window": 3}),
    "qwen2": (tf.Qwen2Config, tf.Qwen2Model, {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 1}),
    "gemma2": (tf.Gemma2Config, tf.Gemma2Model, {"head_dim": 8, "sliding_window": 3, "query_pre_attn_scalar": 8}),
    "gpt_oss": (
        tf.GptOssConfig,
        tf.GptOssModel,
        {"head_dim": 8, "sliding_window": 3, "num_local_experts": 2, "num_experts_per_tok": 1},
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)``: a random checkpoint directory with a word-level tokenizer, saved like a download."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    made = {}

    def make(family):
        if family not in made:
            tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[0]))
            tok.pre_tokenizer = pre_tokenizers.Whitespace()
            fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=WORDS[0], unk_token=WORDS[0])
            cfg_cls, model_cls, extra = FAMILIES[family]
            torch.manual_seed(0)
            path = tmp_path_factory.mktemp(family)
            model_cls(cfg_cls(**SMALL, **extra)).save_pretrained(path)
            fast.save_pretrained(path)
            made[family] = path
        return made[family]

    return make


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_maps_are_causal_and_equal_eager(checkpoint, family, monkeypatch):
    path = checkpoint(family)
    tm = load_text_model(path)
    assert tm.family == "decoder" and tm.is_causal and tm.summary_row == "last"
    assert tm.model.config._attn_implementation == "attnkit"
    batch = tm.encode(TEXTS)
    sums = token_scores(tm, batch, method="raw").sum(-1)
    if family == "gpt_oss":  # attention sinks take part of every row's mass
        assert ((sums > 0) & (sums <= 1 + 1e-6)).all() and (sums < 1 - 1e-3).any()
    else:
        torch.testing.assert_close(sums, torch.ones(2), atol=1e-5, rtol=0)
    # float64 for the comparison (in float32, rounding differences grow through the layers)
    eager = tf.AutoModel.from_pretrained(str(path), attn_implementation="eager")
    if family == "gpt_oss":  # the grouped_mm experts kernel has no float64
        for model in (tm.model, eager):
            model.set_experts_implementation("eager")
    tm.model.double()
    eager.double()
    maps, _ = capture_maps(tm, batch)
    eager_softmax_in_float64(monkeypatch)
    with torch.no_grad():
        ref = eager(**batch, output_attentions=True).attentions
    real = batch["attention_mask"].bool()
    assert len(maps) == len(ref) == SMALL["num_hidden_layers"]
    for ours, theirs in zip(maps, ref):
        assert ours.shape == theirs.shape
        # capture_maps hands back float32 maps: equal to float32 rounding
        torch.testing.assert_close(ours.transpose(1, 2)[real].double(), theirs.transpose(1, 2)[real], atol=1e-6, rtol=0)
        assert (ours.triu(1) == 0).all()  # causal: nothing above the diagonal


def test_rollout_flow_and_relevance_run_on_a_decoder(checkpoint):
    tm = load_text_model(checkpoint("llama"))
    batch = tm.encode(TEXTS)
    real = batch["attention_mask"].bool()
    for method in ("rollout", "flow", "relevance"):
        scores = token_scores(tm, batch, method=method)
        assert scores.shape == real.shape and torch.isfinite(scores).all(), method
        assert (scores[~real] == 0).all(), method
        assert (scores[real] > 0).any(dim=-1).all(), method


def test_explain_text_cli_on_a_decoder(checkpoint, capsys, tmp_path):
    out_file = tmp_path / "r.html"
    argv = ["explain-text", *TEXTS, "--model", str(checkpoint("qwen2")), "--method", "raw", "--out", str(out_file)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "causal" in out and "deposited" in out
    assert "Causal model" in out_file.read_text()
