"""CharDecoder: incremental decoding with KV caches equals one causal forward; left padding changes nothing;
the loader rebuilds a saved model and refuses records that do not fit the weights."""

import json
import math

import pytest
import torch

from attnkit.io import CheckpointError
from attnkit.models.char_decoder import (
    CHARS,
    PAD_ID,
    UNK_ID,
    CharDecoder,
    bits_per_char,
    decode_chars,
    encode_chars,
    load_char_decoder,
)


def _model():
    torch.manual_seed(0)
    return CharDecoder(embed_dim=32, depth=2, num_heads=4, ffn_dim=40).double().eval()


def test_chars_round_trip_and_unknowns():
    text = "def f(x):\n    return x ~ 1"
    assert decode_chars(encode_chars(text)) == text
    assert encode_chars("é") == [UNK_ID] and decode_chars([UNK_ID, PAD_ID]) == "\ufffd"
    assert len(CHARS) + 2 == CharDecoder().embed.num_embeddings


@torch.no_grad()
def test_cached_decoding_equals_one_causal_forward():
    model = _model()
    ids = torch.randint(2, 98, (2, 9))
    full = model(ids)
    cache = model.new_cache()
    parts = [model(ids[:, :4], cache=cache)] + [model(ids[:, i : i + 1], cache=cache) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=0, atol=1e-12)
    assert len(cache[0]) == 9


@torch.no_grad()
def test_left_padding_changes_no_real_position():
    model = _model()
    ids = torch.randint(2, 98, (1, 6))
    padded = torch.cat([torch.full((1, 3), PAD_ID), ids], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    torch.testing.assert_close(model(padded, attention_mask=mask)[:, 3:], model(ids), rtol=0, atol=1e-12)


def test_bad_calls_are_refused():
    model = _model()
    ids = torch.randint(2, 98, (1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model(ids, inputs_embeds=model.embed(ids))
    with pytest.raises(ValueError, match="attention_mask of shape"):
        model(ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="a cache of 2 KVCache"):
        model(ids, cache=[])
    with pytest.raises(ValueError, match="depth"):
        CharDecoder(depth=0)


@torch.no_grad()
def test_bits_per_char_is_the_mean_negative_log2_likelihood():
    model = _model().float()
    text = "abc def\nghi"
    ids = torch.tensor(encode_chars(text))
    # context 4: windows [0:5], [4:9], [8:11]; every character after the first is predicted exactly once
    nll = []
    for start in (0, 4, 8):
        w = ids[start : start + 5]
        logp = model(w[None, :-1])[0].double().log_softmax(-1)
        nll += (-logp.gather(1, w[1:, None])[:, 0]).tolist()
    assert len(nll) == len(text) - 1
    assert bits_per_char(model, text, context=4, batch_size=2) == pytest.approx(sum(nll) / len(nll) / math.log(2))
    with pytest.raises(ValueError, match="at least two characters"):
        bits_per_char(model, "a")


def test_loader_rebuilds_a_saved_model_and_refuses_a_wrong_record(tmp_path):
    from safetensors.torch import save_file

    model = _model().float()
    config = {"embed_dim": 32, "depth": 2, "num_heads": 4, "ffn_dim": 40}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "w.safetensors")
    (tmp_path / "char_decoder.json").write_text(json.dumps({"config": config, "weights": "w.safetensors"}))
    loaded = load_char_decoder(directory=tmp_path)
    ids = torch.randint(2, 98, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)
    (tmp_path / "char_decoder.json").write_text(
        json.dumps({"config": {**config, "depth": 3}, "weights": "w.safetensors"})
    )
    with pytest.raises(CheckpointError, match="depth=3, the weights hold 2 layers"):
        load_char_decoder(directory=tmp_path)
    (tmp_path / "char_decoder.json").write_text(
        json.dumps({"config": {**config, "ffn_dim": 64}, "weights": "w.safetensors"})
    )
    with pytest.raises(CheckpointError, match="does not fit"):
        load_char_decoder(directory=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train with scripts/train_char_decoder\.py"):
        load_char_decoder(directory=tmp_path / "nothing")
