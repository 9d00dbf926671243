"""fastgal.load.decode: the batch JPEG decoder, torchvision's or TorchCodec's, and that they agree."""

from __future__ import annotations

import pytest
import torch

from fastgal.load import decode
from fastgal.shards.read import Shards


def _jpegs(shards, n=24):
    return Shards(shards).split("valid").batch(range(n))[0]


def test_torchvision_and_torchcodec_decode_the_same_pixels(small_shards):
    """Either decoder may serve (torchvision until it drops its decoders, then TorchCodec): on a CPU both are
    libjpeg-turbo, so a batch must come out bit-identical, threaded or not."""
    from concurrent.futures import ThreadPoolExecutor

    jpegs = _jpegs(small_shards)
    tv = decode.decode_batch(jpegs, prefer="torchvision")
    tc = decode.decode_batch(jpegs, prefer="torchcodec")
    assert tv.shape == (24, 3, 112, 112) and tv.dtype == torch.uint8
    assert torch.equal(tv, tc)
    with ThreadPoolExecutor(3) as pool:
        assert torch.equal(decode.decode_batch(jpegs, pool=pool), tv)  # 3 parts, same order


def test_torchcodec_takes_over_when_torchvision_has_no_decoder(small_shards, monkeypatch):
    real = decode._load

    def without_torchvision(name):
        if name == "torchvision":
            raise ImportError("cannot import name 'decode_jpeg' from 'torchvision.io'")
        return real(name)

    monkeypatch.setattr(decode, "_load", without_torchvision)
    decode.decoder.cache_clear()
    try:
        assert decode.decoder_name() == "torchcodec"
        assert decode.decode_batch(_jpegs(small_shards, 4)).shape == (4, 3, 112, 112)
        monkeypatch.setattr(decode, "_load", lambda name: (_ for _ in ()).throw(ImportError(f"no {name}")))
        decode.decoder.cache_clear()
        with pytest.raises(RuntimeError, match="no JPEG decoder: .*pip install torchcodec"):
            decode.decoder()
    finally:
        monkeypatch.undo()
        decode.decoder.cache_clear()
    assert decode.decoder_name() == "torchvision"
