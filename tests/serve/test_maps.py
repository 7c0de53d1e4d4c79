"""pack_maps / unpack_maps: the stored attention maps decode within the quantisation bound, old zlib records too."""

import zlib

import pytest
import torch

from attnkit.serve.maps import CODEC, pack_maps, unpack_maps


def _maps(layers=3, heads=2, length=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(4 * torch.randn(layers, heads, length, length, generator=g), -1)


def test_round_trip_within_the_uint8_bound():
    maps = _maps()
    blob, meta = pack_maps(maps, [f"t{i}" for i in range(7)])
    assert meta["codec"] == CODEC and meta["shape"] == [3, 2, 7, 7] and meta["tokens"][0] == "t0"
    got = unpack_maps(blob, meta)
    bound = maps.amax((-1, -2), keepdim=True) / 510 + 1e-7  # half a quantisation step of each map's peak
    assert got.shape == maps.shape and bool(((got - maps).abs() <= bound).all())
    assert len(blob) < maps.numel()  # compressed below one byte per weight


def test_records_written_with_zlib_still_decode():
    maps = _maps(seed=1)
    blob, meta = pack_maps(maps, list("abcdefg"))
    flat = maps.reshape(6, -1)
    quant = torch.round(flat / torch.tensor(meta["peak"])[:, None] * 255).to(torch.uint8).numpy().tobytes()
    old = {k: v for k, v in meta.items() if k != "codec"}  # what earlier versions stored: zlib, no codec
    assert torch.equal(unpack_maps(zlib.compress(quant, 6), old), unpack_maps(blob, meta))


def test_errors():
    with pytest.raises(ValueError, match="3 tokens"):
        pack_maps(_maps(length=4), ["a", "b", "c"])
    blob, meta = pack_maps(_maps(), list("abcdefg"))
    with pytest.raises(ValueError, match="unknown codec 'lzma'"):
        unpack_maps(blob, {**meta, "codec": "lzma"})
