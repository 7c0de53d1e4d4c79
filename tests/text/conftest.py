import pytest


@pytest.fixture(scope="session")
def minilm():
    from attnkit.text import load_text_model

    return load_text_model(None)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory):
    """A random-initialised GPT-2 checkpoint with a small word-level tokenizer, saved like a hub download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2Model, PreTrainedTokenizerFast

    words = [
        "<|endoftext|>",
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        "river",
        "bank",
        "cash",
        "i",
        "deposited",
        "at",
        "of",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=len(words), n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2Model(config).save_pretrained(path)
    fast.save_pretrained(path)
    return path
