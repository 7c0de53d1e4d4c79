"""Generators for ``explain-text --generate``: Hugging Face causal-LM checkpoint directories (decoder-only on
attn_implementation="attnkit", GPT-2 on sdpa) with left padding, and checkpoints that cannot generate."""

import pytest
import torch
import transformers as tf

from attnkit.cli.main import main
from attnkit.explain.generation import generate_attribution
from attnkit.text import TextModelError
from attnkit.text.generation import load_generator

WORDS = ["<|endoftext|>", "the", "a", "cat", "dog", "sat", "on", "mat", "river", "bank", "cash", "i", "at"]
SMALL = dict(vocab_size=len(WORDS), initializer_range=1.0)


def _save(path, model):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token=WORDS[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=WORDS[0], unk_token=WORDS[0])
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        **SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    return _save(tmp_path_factory.mktemp("llama"), tf.LlamaForCausalLM(cfg))


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(**SMALL, n_embd=32, n_layer=2, n_head=4, n_positions=32)
    return _save(tmp_path_factory.mktemp("gpt2"), tf.GPT2LMHeadModel(cfg))


@pytest.mark.parametrize("which", ["llama_dir", "gpt2_dir"])
def test_a_padded_batch_gives_each_prompt_its_own_attribution(request, which):
    gen = load_generator(request.getfixturevalue(which))
    ids, mask = gen.encode(["the cat sat on the", "a dog"])
    assert mask.tolist() == [[1] * 5, [0, 0, 0, 1, 1]] and ids[1, :3].tolist() == [gen.pad_id] * 3
    both = generate_attribution(gen.model, ids, mask, max_new_tokens=3, methods=("rollout", "grad_input"))
    alone = generate_attribution(gen.model, ids[1:, 3:], max_new_tokens=3, methods=("rollout", "grad_input"))
    assert torch.equal(both.sequences[1, 3:], alone.sequences[0])
    for method in ("rollout", "grad_input"):
        torch.testing.assert_close(both[method][1, :, 3:], alone[method][0], rtol=1e-4, atol=1e-5)
    assert gen.token_id("cat") == 3
    with pytest.raises(ValueError, match="not a single token"):
        gen.token_id("zebra")


def test_cli_generates_with_a_checkpoint_directory(capsys, llama_dir):
    code = main(["explain-text", "the cat", "--model", str(llama_dir), "--generate", "2", "--method", "relevance"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "relevance: what each generated token draws on (" in out and out.count(" <- ") == 2


def test_checkpoints_that_cannot_generate_are_refused(tmp_path, minilm):
    with pytest.raises(TextModelError, match="is an encoder and cannot generate"):
        load_generator(minilm.path)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(**SMALL, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4)
    headless = _save(tmp_path / "headless", tf.LlamaModel(cfg))  # saved without its language-model head
    with pytest.raises(TextModelError, match="missing"):
        load_generator(headless)
