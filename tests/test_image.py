"""The weight image file (contract/image.py): round trip, and every bad image is an ImageError naming the problem.

The valid images come from quantizing tiny random GPT-2 / GPT-Neo checkpoints written here with NumPy.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import TINY_MODEL, run_cli, write_tiny_model
from gpt_fpga.contract.errors import ImageError
from gpt_fpga.contract.image import MAGIC, PREAMBLE, data_start, read_image, write_image
from gpt_fpga.contract.layout import SECTION_ALIGN, HwLayout
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.contract.numerics import CONTRACT_VERSION

VOCAB = TINY_MODEL["vocab"]  # of the images quantized from conftest.write_tiny_model


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images")
    out = {}
    for family in ("gpt2", "gpt_neo"):
        model = write_tiny_model(root / family, family)
        out[family] = root / f"{family}.img"
        quantize_checkpoint(model, out[family], calib_tokens=16, progress=False)
    return out


@pytest.fixture
def img(images, tmp_path) -> Path:
    """A private copy of the GPT-2 image that the test may damage."""
    p = tmp_path / "model.img"
    p.write_bytes(images["gpt2"].read_bytes())
    return p


def preamble(path: Path):
    magic, version, hlen, hcrc = PREAMBLE.unpack(path.read_bytes()[:PREAMBLE.size])
    return magic, version, hlen, hcrc


def header_of(path: Path) -> dict:
    hlen = preamble(path)[2]
    return json.loads(path.read_bytes()[PREAMBLE.size:PREAMBLE.size + hlen])


def section_span(path: Path, name: str) -> tuple[int, int]:
    """Absolute [start, end) of a section in the file."""
    hlen = preamble(path)[2]
    entry = next(e for e in header_of(path)["sections"] if e["name"] == name)
    start = data_start(hlen) + entry["offset"]
    return start, start + entry["size"]


def rewrite_header(src: Path, dst: Path, mutate) -> None:
    """Re-emit src with mutate(header) applied and a *valid* header checksum (so later checks are reached)."""
    raw = src.read_bytes()
    _, version, hlen, _ = PREAMBLE.unpack(raw[:PREAMBLE.size])
    h = json.loads(raw[PREAMBLE.size:PREAMBLE.size + hlen])
    body = raw[data_start(hlen):]
    mutate(h)
    new = json.dumps(h, sort_keys=True).encode()
    pad = data_start(len(new)) - PREAMBLE.size - len(new)
    dst.write_bytes(PREAMBLE.pack(MAGIC, version, len(new), zlib.crc32(new)) + new + b"\0" * pad + body)


def flip(path: Path, pos: int, xor: int = 0x55) -> None:
    b = bytearray(path.read_bytes())
    b[pos] ^= xor
    path.write_bytes(bytes(b))


def expect_image_error(path, *needles, **kw) -> str:
    with pytest.raises(ImageError) as e:
        read_image(path, **kw)
    msg = str(e.value)
    for n in needles:
        assert n in msg, (n, msg)
    assert str(path) in msg  # the message names the file
    return msg


# ---- round trip --------------------------------------------------------------------------------
def test_write_read_round_trip(tmp_path):
    header = {"contract_version": CONTRACT_VERSION, "config": {"anything": [1, 2, 3]},
              "hardware": HwLayout(bus_bits=128, weights="int4", group=64).to_dict(), "note": "héllo"}
    rng = np.random.default_rng(1)
    sections = {"first": rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(), "empty": b"",
                "exact": bytes(range(256)) * 16, "last": b"xyz"}  # 4096 bytes exactly: next on the next page
    p = tmp_path / "rt.img"
    write_image(p, header, sections)
    assert not (tmp_path / "rt.img.partial").exists()
    im = read_image(p)
    for k, v in header.items():
        assert im.header[k] == v
    assert im.hw == HwLayout(bus_bits=128, weights="int4", group=64)
    for name, blob in sections.items():
        assert im.has_section(name) and bytes(im.section(name)) == blob
    assert not im.has_section("nope")
    with pytest.raises(ImageError, match="no section 'nope'"):
        im.section("nope")
    offsets = [e["offset"] for e in im.header["sections"]]
    assert all(o % SECTION_ALIGN == 0 for o in offsets) and offsets == sorted(offsets)
    # size is exactly data start + data_size: the last section is not padded
    assert p.stat().st_size == data_start(preamble(p)[2]) + offsets[-1] + 3
    assert preamble(p)[:2] == (MAGIC, 1)


def test_quantized_image_reads_and_verifies(images):
    for family, path in images.items():
        im = read_image(path, expect_hw=HwLayout())
        assert im.header["config"]["family"] == family
        assert im.header["contract_version"] == CONTRACT_VERSION
        FixedModel(im).forward([1, 2, 3])


# ---- bad images --------------------------------------------------------------------------------
def test_bad_magic(img):
    b = bytearray(img.read_bytes())
    b[0:8] = b"PK\x03\x04zip!"
    img.write_bytes(bytes(b))
    expect_image_error(img, "bad magic", "not a gpt-fpga weight image")


def test_not_an_image_at_all(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello world, this is not an image but it is longer than the preamble\n")
    expect_image_error(p, "bad magic")


def test_unknown_format_version(img):
    b = bytearray(img.read_bytes())
    b[8:12] = struct.pack("<I", 7)
    img.write_bytes(bytes(b))
    expect_image_error(img, "format version 7", "not supported")


def test_header_checksum_mismatch(img):
    flip(img, PREAMBLE.size + 5)  # a byte inside the JSON header
    expect_image_error(img, "header checksum mismatch")


def test_header_crc_field_itself_damaged(img):
    flip(img, 16)  # the stored crc32, not the header
    expect_image_error(img, "header checksum mismatch")


@pytest.mark.parametrize("name", ["L0.ln1", "L0.qkv", "L1.gelu", "lm_head", "wpe"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_section_checksum_mismatch(img, name, where):
    start, end = section_span(img, name)
    pos = {"first": start, "middle": (start + end) // 2, "last": end - 1}[where]
    flip(img, pos, 0x01)  # a single bit
    expect_image_error(img, "checksum mismatch", f"'{name}'")


def test_section_damage_ignored_when_not_verifying(img):
    start, _ = section_span(img, "wpe")
    flip(img, start)
    read_image(img, verify=False)  # the explicit opt-out reads the (corrupt) bytes


def test_padding_between_sections_is_not_covered(img):
    # zero padding up to the next page is not part of any section: damaging it is harmless
    _, end = section_span(img, "L0.ln1")
    flip(img, end)
    read_image(img)


@pytest.mark.parametrize("where", ["empty", "preamble", "preamble_end", "header", "header_end", "at_data",
                                   "section", "last_byte"])
def test_truncation(img, where):
    size = img.stat().st_size
    hlen = preamble(img)[2]
    wpe = section_span(img, "wpe")
    cut = {"empty": 0, "preamble": 10, "preamble_end": PREAMBLE.size, "header": PREAMBLE.size + hlen // 2,
           "header_end": PREAMBLE.size + hlen, "at_data": data_start(hlen), "section": (wpe[0] + wpe[1]) // 2,
           "last_byte": size - 1}[where]
    img.write_bytes(img.read_bytes()[:cut])
    msg = expect_image_error(img, "truncated")
    if where in ("empty", "preamble"):
        assert "preamble" in msg
    if where in ("preamble_end", "header"):
        assert "header needs" in msg


def test_trailing_bytes(img):
    with open(img, "ab") as f:
        f.write(b"\0")
    expect_image_error(img, "trailing bytes")
    with open(img, "ab") as f:
        f.write(b"junk" * 5000)
    expect_image_error(img, "trailing bytes")


@pytest.mark.parametrize("other", [HwLayout(bus_bits=128), HwLayout(weights="int4"),
                                   HwLayout(weights="int8", group=64)])
def test_hardware_layout_mismatch(img, other):
    # the tiny image is int8, 64-bit beats, group 128 (the defaults); group differs only in the last case,
    # which counts as a different layout too (the HwLayout dataclasses differ)
    expect_image_error(img, "made for hardware", "re-quantize", expect_hw=other)
    read_image(img, expect_hw=HwLayout())


def test_wrong_contract_version(img, tmp_path):
    bad = tmp_path / "contract.img"
    rewrite_header(img, bad, lambda h: h.update(contract_version=CONTRACT_VERSION + 1))
    expect_image_error(bad, f"numeric contract version {CONTRACT_VERSION + 1}", "re-run 'gpt-fpga quantize'")
    rewrite_header(img, bad, lambda h: h.pop("contract_version"))
    expect_image_error(bad, "numeric contract version None")


def test_rewrite_header_helper_is_faithful(img, tmp_path):
    same = tmp_path / "same.img"
    rewrite_header(img, same, lambda h: None)
    FixedModel(read_image(same))


@pytest.mark.parametrize("mutate, needle", [
    (lambda h: h.update(hardware={"bus_bits": 96, "weights": "int8", "group": 32}), "unsupported hardware layout"),
    (lambda h: h.update(hardware={"bus_bits": 64, "weights": "int2", "group": 32}), "unsupported hardware layout"),
    (lambda h: h.update(hardware={"bus": 64}), "unsupported hardware layout"),
    (lambda h: h.pop("config"), "header field 'config'"),
    (lambda h: h.update(sections="x"), "header field 'sections'"),
    (lambda h: h.update(data_size="big"), "header field 'data_size'"),
    (lambda h: h.update(data_size=h["data_size"] + 1), "truncated"),
    (lambda h: h.update(data_size=h["data_size"] - 1), "trailing bytes"),
    (lambda h: h["sections"][2].update(offset=h["sections"][2]["offset"] + 8), "not 4096-byte aligned"),
    (lambda h: h["sections"][-1].update(size=h["sections"][-1]["size"] + 1), "runs past the end"),
    (lambda h: h["sections"][0].update(crc32=-1), "malformed section table entry"),
    (lambda h: h["sections"].append(7), "malformed section table entry"),
    (lambda h: h.update(format_version=2), "format_version disagrees"),
])
def test_malformed_header(img, tmp_path, mutate, needle):
    bad = tmp_path / "bad.img"
    rewrite_header(img, bad, mutate)
    expect_image_error(bad, needle)


def test_header_not_json_or_not_object(img, tmp_path):
    for raw in (b"[1, 2, 3]", b"{not json", b"\xff\xfe{}"):
        p = tmp_path / "h.img"
        p.write_bytes(PREAMBLE.pack(MAGIC, 1, len(raw), zlib.crc32(raw)) + raw)
        expect_image_error(p, "corrupt header")


def test_header_length_absurd(tmp_path):
    p = tmp_path / "h.img"
    p.write_bytes(PREAMBLE.pack(MAGIC, 1, 0xFFFFFFFF, 0) + b"{}")
    expect_image_error(p, "truncated", "header needs")


def test_directory_and_missing_file(tmp_path):
    expect_image_error(tmp_path, "is a directory")
    expect_image_error(tmp_path / "nope.img", "no such image file")


@pytest.mark.parametrize("mutate, needle", [
    (lambda h: h["config"].update(n_layer=3), "config"),      # local_layers and layers have 2 entries
    (lambda h: h["config"].update(d_model=64), "does not match its header"),
    (lambda h: h["config"].update(vocab_size=10 ** 6), "config"),  # beyond the matvec row limit
    (lambda h: h["layers"][0].pop("ln1_shift"), r"layers\[0\]\.ln1_shift"),
    (lambda h: h["layers"][1].update(score_shift=1e300), r"layers\[1\]\.score_shift"),
    (lambda h: h["layers"][0].update(ctx_mult=None), r"layers\[0\]\.ctx_mult"),
    (lambda h: h["config"].update(n_head=0), "config"),
    (lambda h: h["config"].update(n_head=17), "config"),
    (lambda h: h.update(ln_eps_table=h["ln_eps_table"][:5]), "ln_eps_table"),
    (lambda h: h["config"].pop("n_head"), "config"),
    (lambda h: h["sections"].pop(), "no section"),  # drop 'wpe' from the table (and its bytes stay as padding)
])
def test_content_disagreeing_with_header(img, tmp_path, mutate, needle):
    """A well-formed, checksummed header that does not describe its sections: FixedModel says ImageError."""
    bad = tmp_path / "bad.img"

    def m(h):
        mutate(h)
        if h["sections"]:  # keep data_size consistent so read_image accepts the file
            last = h["sections"][-1]
            h["data_size"] = last["offset"] + last["size"]
    rewrite_header(img, bad, m)
    raw = bad.read_bytes()
    hlen = preamble(bad)[2]
    bad.write_bytes(raw[:data_start(hlen) + header_of(bad)["data_size"]])
    im = read_image(bad)
    with pytest.raises(ImageError, match=needle):
        FixedModel(im)


def test_eps_table_of_wrong_length_is_refused_at_load(img, tmp_path):
    bad = tmp_path / "eps17.img"
    rewrite_header(img, bad, lambda h: h.update(ln_eps_table=h["ln_eps_table"][:17]))
    with pytest.raises(ImageError, match="ln_eps_table"):
        FixedModel(read_image(bad))


# ---- the same problems through the CLI ---------------------------------------------------------
def test_cli_generate_valid_image(capsys, img):
    rc, out, err = run_cli(capsys, "generate", img, "--backend", "fixed", "--ids", "1,2", "--max-new-tokens", "3")
    assert rc == 0, err
    toks = out.split()  # no tokenizer in the image: the new ids are printed, 1..3 of them (EOS may stop early)
    assert 1 <= len(toks) <= 3 and all(0 <= int(t) < VOCAB for t in toks)


@pytest.mark.parametrize("damage, needle", [
    ("magic", "bad magic"),
    ("version", "format version"),
    ("header", "header checksum mismatch"),
    ("section", "checksum mismatch in section 'L1.fc'"),
    ("truncate", "truncated"),
    ("trailing", "trailing bytes"),
])
def test_cli_bad_image(capsys, img, damage, needle):
    b = bytearray(img.read_bytes())
    if damage == "magic":
        b[:8] = b"GPTFPGA1"
    elif damage == "version":
        b[8] += 1
    elif damage == "header":
        b[PREAMBLE.size + 1] ^= 0xFF
    elif damage == "section":
        s, e = section_span(img, "L1.fc")
        b[(s + e) // 2] ^= 0x80
    elif damage == "truncate":
        b = b[:len(b) // 2]
    else:
        b += b"\0" * 100
    img.write_bytes(bytes(b))
    rc, out, err = run_cli(capsys, "generate", img, "--backend", "fixed", "--ids", "1,2")
    assert rc == 2
    assert err.startswith("gpt-fpga: error: ") and needle in err and str(img) in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert out == ""


def test_cli_directory_and_missing(capsys, tmp_path):
    for target, needle in ((tmp_path, "is a directory"), (tmp_path / "missing.img", "no such image file")):
        rc, out, err = run_cli(capsys, "generate", target, "--backend", "fixed", "--ids", "1,2")
        assert rc == 2 and needle in err and "Traceback" not in err, err


# ---- fuzz --------------------------------------------------------------------------------------
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 20), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20), st.just(b"")),
    st.tuples(st.just("extend"), st.just(0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 20), st.integers(1, 16)),
)


def apply_edits(blob: bytes, edits, hot: bool) -> bytes:
    b = bytearray(blob)
    for kind, pos, arg in edits:
        if not b and kind not in ("extend", "set"):
            continue
        # half of the edits land in the first 128 bytes (preamble and start of the header), the rest anywhere
        pos = pos % 128 if hot and b else pos % max(len(b), 1)
        if kind == "flip":
            b[pos % len(b)] ^= arg
        elif kind == "set":
            b[pos:pos + len(arg)] = arg
        elif kind == "truncate":
            del b[pos:]
        elif kind == "extend":
            b += arg
        elif kind == "insert":
            b[pos:pos] = arg
        else:
            del b[pos:pos + arg]
    return bytes(b)


def must_be_image_error_or_ok(path: Path):
    try:
        im = read_image(path)
    except ImageError:
        return "error"
    try:
        model = FixedModel(im)
    except ImageError:
        return "model-error"
    model.forward_int([1, 2])  # a successful load must also run
    return "ok"


@FUZZ
@given(family=st.sampled_from(["gpt2", "gpt_neo"]), edits=st.lists(edit, min_size=1, max_size=4),
       hot=st.booleans())
def test_fuzz_mutated_image(images, tmp_path_factory, family, edits, hot):
    blob = apply_edits(images[family].read_bytes(), edits, hot)
    p = tmp_path_factory.getbasetemp() / "fuzz.img"
    p.write_bytes(blob)
    event(must_be_image_error_or_ok(p))


@FUZZ
@given(blob=st.one_of(st.binary(max_size=256), st.binary(min_size=8, max_size=256).map(lambda b: MAGIC + b),
                     st.binary(min_size=0, max_size=256).map(lambda b: MAGIC + struct.pack("<I", 1) + b)))
def test_fuzz_random_bytes(tmp_path_factory, blob):
    p = tmp_path_factory.getbasetemp() / "random.img"
    p.write_bytes(blob)
    with pytest.raises(ImageError):
        read_image(p)
