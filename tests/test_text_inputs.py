"""What a new user can feed the command line by mistake: text that is not UTF-8, binary files given as
text, outputs that cannot be written, flags past what they can do, and options without help.

Each case: exit code 2, one 'gpt-fpga: error:' line naming the file or argument, no traceback
(conftest.expect_error)."""

from __future__ import annotations

import argparse
import os
import struct
from pathlib import Path

import pytest

from conftest import MODELS, TINY_GPT2, expect_error, run_cli
from gpt_fpga.contract.image import MAGIC as IMAGE_MAGIC
from gpt_fpga.quantize.text_input import decode_text

KJV = "In the beginning God created the heaven and the earth. And the earth was without form, and void.\n"


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# name -> (bytes of the file, what the error must say)
BAD_TEXTS = {
    "latin-1": (KJV.encode() + "Ézéchiel\n".encode("latin-1"), [f"byte 0xc9 at byte offset {len(KJV)}", "line 2",
                                                                "re-encode"]),
    "utf-16": (KJV.encode("utf-16"), ["UTF-16", "re-encode"]),
    "safetensors": (struct.pack("<Q", 2) + b"{}" + bytes(64), ["looks binary (a safetensors file)"]),
    "weight-image": (IMAGE_MAGIC + bytes(64), ["looks binary (a gpt-fpga weight image)"]),
    "png": (b"\x89PNG\r\n\x1a\n" + KJV.encode(), ["looks binary (a PNG image)"]),
    "nul": (KJV.encode() + b"\0" + KJV.encode(), [f"a NUL byte at byte offset {len(KJV)}"]),
    "controls": (KJV.encode() + b"\x01\x02\x03", ["3 of its", "control characters"]),
}


def reader_argv(reader: str, model: Path, text: Path, tmp_path: Path) -> list:
    """A command that reads `text` as --text or --calib."""
    if reader == "perplexity":
        return ["perplexity", model, "--text", text]
    if reader == "quantize --calib":
        return ["quantize", model, "-o", tmp_path / "q.img", "--calib", text]
    if reader == "compare":
        return ["compare", model, tmp_path / "any.img", "--text", text, "--out", tmp_path / "cmp"]
    return ["compare", tmp_path / "any.img", "--backend", "rtl", "--text", text, "--out", tmp_path / "cmp"]


READERS = ("perplexity", "quantize --calib", "compare", "compare --backend rtl")


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("kind", list(BAD_TEXTS))
def test_bad_text_file_is_refused_naming_file_and_offset(capsys, tiny_dir, tmp_path, reader, kind):
    data, needles = BAD_TEXTS[kind]
    text = _write(tmp_path / f"{kind}.txt", data)
    option = "--calib" if "calib" in reader else "--text"
    expect_error(capsys, reader_argv(reader, tiny_dir, text, tmp_path), f"{option} {text}", *needles)
    assert not (tmp_path / "q.img").exists() and not (tmp_path / "cmp").exists()


@pytest.mark.parametrize("reader", READERS)
def test_binary_text_is_refused_before_any_work(capsys, tmp_path, reader):
    """The model is not even looked at: a missing model would otherwise be the error."""
    text = _write(tmp_path / "weights.txt", BAD_TEXTS["safetensors"][0])
    expect_error(capsys, reader_argv(reader, tmp_path / "no-model", text, tmp_path), str(text), "looks binary")


def test_the_bundled_safetensors_as_calibration_text(capsys, tmp_path):
    """The case a user hit (it used to calibrate on the weights' bytes and exit 0). As --text it used to
    start an hour of perplexity: the tiny safetensors cases above cover that reader."""
    weights = MODELS / "gpt2-kjv" / "model.safetensors"
    expect_error(capsys, ["quantize", MODELS / "gpt2-kjv", "-o", tmp_path / "x.img", "--calib", weights],
                 f"--calib {weights}", "safetensors")
    assert not (tmp_path / "x.img").exists()


def test_prompt_that_is_not_utf8(capsys, tiny_dir):
    """argv bytes that are not UTF-8 reach Python as lone surrogates (PEP 383): b'\\xff' -> '\\udcff'."""
    prompt = os.fsdecode(b"And God \xff said")
    expect_error(capsys, ["generate", tiny_dir, "--prompt", prompt, "--max-new-tokens", "1"], "--prompt",
                 "byte 0xff at byte offset 8")


def test_utf8_with_a_byte_order_mark_is_text():
    assert decode_text(b"\xef\xbb\xbf" + KJV.encode(), "x") == KJV
    assert decode_text("Ézéchiel\tand\r\n".encode(), "x") == "Ézéchiel\tand\r\n"


def test_text_of_a_few_bytes_is_not_binary():
    """The control-byte share of a short, ordinary text is zero: no false alarm on tiny files."""
    assert decode_text(b"A", "x") == "A" and decode_text(b"", "x") == ""


# ---------------------------------------------------------------------------------------------
# outputs and capped flags

@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_write_error_names_the_file(capsys, tiny_dir):
    expect_error(capsys, ["logits", tiny_dir, "--ids", "1,2", "--out", "/dev/full"], "--out /dev/full",
                 "no space left on device")


def test_quantize_refuses_an_output_that_is_not_a_regular_file(capsys, tiny_dir, tmp_path):
    """The image is written beside -o and renamed over it: a pipe (or a device) would be replaced."""
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    expect_error(capsys, ["quantize", tiny_dir, "-o", pipe, "--calib-tokens", "16"], f"-o {pipe}",
                 "not a regular file")
    assert pipe.is_fifo()


@pytest.fixture
def tiny_image(capsys, tiny_dir, tmp_path) -> Path:
    image = tmp_path / "tiny.img"
    rc, _, err = run_cli(capsys, "quantize", tiny_dir, "-o", image, "--calib-tokens", "16")
    assert rc == 0, err
    return image


def test_compare_tokens_beyond_the_context_are_refused(capsys, tiny_dir, tiny_image, tmp_path):
    text = _write(tmp_path / "kjv.txt", KJV.encode() * 20)
    expect_error(capsys, ["compare", tiny_dir, tiny_image, "--text", text, "--out", tmp_path / "c", "--tokens", "5000"],
                 "--tokens 5000", f"context of {TINY_GPT2['n_ctx']} tokens")
    assert not (tmp_path / "c").exists()


def test_compare_says_when_the_text_is_shorter_than_tokens(capsys, tiny_dir, tiny_image, tmp_path):
    text = _write(tmp_path / "short.txt", b"And God said, Let there be light")
    rc, out, err = run_cli(capsys, "compare", tiny_dir, tiny_image, "--text", text, "--out", tmp_path / "c",
                           "--tokens", "32")
    assert rc == 0, err
    assert f"--text {text} has only" in err and "(--tokens 32)" in err, err


def test_top_k_beyond_the_vocabulary_is_refused(capsys, tiny_dir):
    expect_error(capsys, ["generate", tiny_dir, "--ids", "1", "--top-k", "5000"], "--top-k 5000",
                 f"vocabulary of {TINY_GPT2['vocab']}")


def test_every_option_has_help_with_its_default():
    from gpt_fpga.host.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            label = f"{name} {'/'.join(action.option_strings) or action.dest}"
            if not action.help:
                missing.append(f"{label}: no help")
            elif action.default not in (None, False) and "default" not in action.help:
                missing.append(f"{label}: default {action.default} not shown")
    assert not missing, missing
