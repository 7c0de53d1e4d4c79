"""The SHIPPED character-level decoder (attnkit/data): the files match their record, the weights load, and they
reach the recorded held-out bits per character on the recorded slice of the test topics."""

import hashlib

import pytest
import torch

from attnkit.datasets import language_reference_text
from attnkit.explain import generate_attribution
from attnkit.models.char_decoder import (
    DATA_DIR,
    bits_per_char,
    decode_chars,
    encode_chars,
    load_char_decoder,
    load_char_decoder_metadata,
)


@pytest.fixture(scope="module")
def meta():
    return load_char_decoder_metadata()


@pytest.fixture(scope="module")
def model():
    return load_char_decoder()


def test_shipped_files_match_the_record(meta):
    path = DATA_DIR / meta["weights"]
    assert path.stat().st_size < 2_000_000
    assert hashlib.sha256(path.read_bytes()).hexdigest() == meta["sha256"]
    assert meta["training"]["seconds"] <= 600  # trained within the 10-minute budget


def test_reaches_the_recorded_bits_per_char_on_the_test_slice(meta, model):
    ev = meta["evaluation"]
    text = language_reference_text("test")[: ev["test_slice_characters"]]
    torch.set_num_threads(min(2, torch.get_num_threads()))
    bpc = bits_per_char(model, text, context=ev["context"])
    assert bpc == pytest.approx(ev["test_slice_bits_per_char"], abs=1e-3)
    # far below a uniform guess (log2 98 = 6.6 bits) and a unigram model of the training characters (4.7 bits)
    assert ev["test_bits_per_char"] < 3.0


def test_generates_language_reference_english(model):
    prompt = torch.tensor([encode_chars("The value of the ")])
    res = generate_attribution(model, prompt, max_new_tokens=24, methods="rollout")
    words = decode_chars(res.generated[0]).split()
    vocabulary = set(language_reference_text("train").split())
    assert sum(w in vocabulary for w in words) >= len(words) - 1  # real words, not noise
