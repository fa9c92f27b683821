"""`gpt-fpga compare`: per-layer, per-operation accuracy report of fixed against float (host/compare.py)."""

from __future__ import annotations

import json
import math
import struct
import zlib

import pytest

from conftest import MODELS, run_cli
from gpt_fpga.host.cli import main
from gpt_fpga.quantize.quantizer import quantize_checkpoint

GPT2 = MODELS / "gpt2-kjv"
TEXT = MODELS / "kjv-heldout.txt"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# every operation of a transformer layer the report must cover, in the order a layer computes them
LAYER_OPS = ("ln1", "q", "k", "v", "ctx", "resid_attn", "ln2", "fc", "gelu", "resid_mlp")


@pytest.fixture(scope="module")
def gpt2_int8(tmp_path_factory):
    img = tmp_path_factory.mktemp("cmp") / "gpt2-int8.img"
    quantize_checkpoint(GPT2, img, weights="int8", calib=TEXT, progress=False)
    return img


@pytest.fixture(scope="module")
def report(gpt2_int8, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp-out") / "report"  # does not exist yet: compare creates it
    rc = main(["compare", str(GPT2), str(gpt2_int8), "--text", str(TEXT), "--out", str(out)])
    assert rc == 0
    return out


def test_compare_json(report, gpt2_int8):
    summary = json.loads((report / "compare.json").read_text())
    n_layer = json.loads((GPT2 / "config.json").read_text())["n_layer"]
    assert summary["tokens"] == 256  # default --tokens, = the model's context
    assert summary["model"] == str(GPT2) and summary["image"] == str(gpt2_int8) and summary["text"] == str(TEXT)
    assert summary["hardware"] == {"bus_bits": 64, "weights": "int8", "group": 128}  # the defaults
    assert len(summary["layers"]) == n_layer
    for i, row in enumerate(summary["layers"]):
        assert list(row) == list(LAYER_OPS), i
        for op, stats in row.items():
            assert set(stats) == {"snr_db", "cosine", "max_abs_err"}, (i, op)
            assert stats["snr_db"] > 10, (i, op, stats)  # every intermediate tracks float to within 10 dB
            assert 0.9 < stats["cosine"] <= 1.0 + 1e-9 and stats["max_abs_err"] >= 0, (i, op, stats)
    for key in ("lnf", "logits"):
        assert set(summary[key]) == {"snr_db", "cosine", "max_abs_err"}
    assert summary["logits"]["snr_db"] > 15
    assert summary["top1_agreement"] > 0.8
    assert math.isfinite(summary["logits"]["snr_db"])


def test_compare_png(report):
    png = (report / "compare.png").read_bytes()
    assert png[:8] == PNG_MAGIC
    assert len(png) > 20_000  # two panels of lines and bars, not a blank image
    # chunk structure: IHDR first with a sensible size, every chunk's CRC valid, IEND last
    pos, chunks = 8, []
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        data, crc = png[pos + 8:pos + 8 + length], struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])[0]
        assert zlib.crc32(kind + data) == crc, kind
        chunks.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", data[:8])
            assert width >= 800 and height >= 300
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks and pos == len(png)


def test_compare_cli_message(capsys, gpt2_int8, tmp_path):
    out = tmp_path / "r2"
    rc, stdout, err = run_cli(capsys, "compare", GPT2, gpt2_int8, "--text", TEXT, "--out", out, "--tokens", "32")
    assert rc == 0, err
    assert "logits SNR" in stdout and "top-1 agreement" in stdout and str(out) in stdout
    assert json.loads((out / "compare.json").read_text())["tokens"] == 32


def test_compare_image_from_another_model(capsys, tiny_dir, tmp_path):
    other = tmp_path / "tiny.img"
    quantize_checkpoint(tiny_dir, other, calib_tokens=16, progress=False)
    capsys.readouterr()  # the calibration progress bars
    rc, out, err = run_cli(capsys, "compare", GPT2, other, "--text", TEXT, "--out", tmp_path / "r")
    assert rc == 2
    assert err.startswith("gpt-fpga: error: ") and "was not made from" in err and str(other) in err, err
    assert "Traceback" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("case, needle", [("no-text", "no such text file"), ("short-text", "needs at least 2 tokens"),
                                          ("dir-image", "is a directory")])
def test_compare_input_errors(capsys, gpt2_int8, tmp_path, case, needle):
    text, image = TEXT, gpt2_int8
    if case == "no-text":
        text = tmp_path / "missing.txt"
    elif case == "short-text":
        text = tmp_path / "short.txt"
        text.write_text("A")
    else:
        image = tmp_path
    rc, out, err = run_cli(capsys, "compare", GPT2, image, "--text", text, "--out", tmp_path / "r")
    assert rc == 2 and needle in err and "Traceback" not in err, err
