"""The bit-exact fixed-point model (sim/fixed_model.py) and the quantizer that feeds it.

* prefill == token-by-token decode, bit for bit, for both families, int8/int4, both bus widths;
* the row stream round-trips (contract/layout.py), and its bytes are where the docstring says;
* an independent pure-Python re-implementation of the whole forward pass (plain ints, tables rebuilt
  from the docstring formulas, weights parsed from the raw section bytes) equals FixedModel exactly;
* the quantizer's integer ranges, its calibration messages and option checks;
* int8 neo-kjv through the CLI generates the same greedy tokens as the float model.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import MODELS, TINY_MODEL, run_cli, write_tiny_model
from gpt_fpga.host.cli import main
from gpt_fpga.contract.errors import InputError
from gpt_fpga.contract.image import read_image
from gpt_fpga.contract.layout import HwLayout, layer_matrices, pack_matrix, unpack_matrix
from gpt_fpga.quantize.quantizer import quantize_checkpoint
from gpt_fpga.contract import numerics as nx
from gpt_fpga.sim.fixed_model import FixedModel

# the tiny checkpoints of conftest.write_tiny_model (Neo: layer 0 local with window 3, layer 1 global)
VOCAB, LAYERS, N_CTX = TINY_MODEL["vocab"], TINY_MODEL["layers"], TINY_MODEL["n_ctx"]

VARIANTS = {  # name: (family, weights, group, bus_bits)
    "gpt2-int8-b64": ("gpt2", "int8", 32, 64),
    "gpt2-int4-g32-b128": ("gpt2", "int4", 32, 128),
    "neo-int8-b128": ("gpt_neo", "int8", 32, 128),
    "neo-int4-g64-b64": ("gpt_neo", "int4", 64, 64),
}


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fixed")
    models = {fam: write_tiny_model(root / fam, fam, seed=3) for fam in ("gpt2", "gpt_neo")}
    out = {}
    for name, (fam, weights, group, bus) in VARIANTS.items():
        out[name] = root / f"{name}.img"
        quantize_checkpoint(models[fam], out[name], weights=weights, group=group, bus_bits=bus, calib_tokens=16,
                            progress=False)
    return out


IDS = [5, 17, 63, 0, 42, 42, 7, 1, 30, 12, 9, 55]  # 12 tokens: longer than the Neo window of 3


# ---- (a) prefill == decode -----------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_equals_token_by_token_decode(tiny_images, variant):
    im = read_image(tiny_images[variant])
    assert im.hw == HwLayout(bus_bits=VARIANTS[variant][3], weights=VARIANTS[variant][1], group=VARIANTS[variant][2])
    m = FixedModel(im)
    if VARIANTS[variant][0] == "gpt_neo":
        assert [L["window"] for L in m.layers] == [3, 0] and len(IDS) > 3
    full = m.forward_int(IDS)
    assert full.dtype == np.int64 and full.shape == (len(IDS), VOCAB)
    m.reset()
    steps = np.concatenate([m.forward_int([t]) for t in IDS])
    assert np.array_equal(full, steps)
    m.reset()
    chunks = np.concatenate([m.forward_int(IDS[:5]), m.forward_int(IDS[5:6]), m.forward_int(IDS[6:])])
    assert np.array_equal(full, chunks)
    # the logits are not degenerate: they vary over the vocabulary and between positions
    assert len(np.unique(full)) > VOCAB and not np.array_equal(full[0], full[1])
    # and the float view is exactly int / 2**16
    m.reset()
    assert np.array_equal(m.forward(IDS), (full * 2.0 ** -16).astype(np.float32))


def test_context_overflow_is_refused(tiny_images):
    m = FixedModel(read_image(tiny_images["gpt2-int8-b64"]))
    m.forward_int(list(range(N_CTX)))
    with pytest.raises(ValueError, match="exceeds the context"):
        m.forward_int([1])


# ---- (b) the packed stream -------------------------------------------------------------------------
@pytest.mark.parametrize("weights, group", [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128)])
@pytest.mark.parametrize("bus_bits", [64, 128])
@pytest.mark.parametrize("d_in", [1, 7, 37, 131])
def test_pack_unpack_round_trip(weights, group, bus_bits, d_in):
    rng = np.random.default_rng(d_in * bus_bits + group)
    hw = HwLayout(bus_bits=bus_bits, weights=weights, group=group)
    d_out = 5
    lo, hi = (-8, 7) if weights == "int4" else (-128, 127)
    w = rng.integers(lo, hi + 1, (d_out, d_in))
    w[0, 0], w[-1, -1] = lo, hi
    gs = rng.integers(1, 256, (d_out, -(-d_in // group))) if weights == "int4" else None
    bias = rng.integers(-(1 << 31), 1 << 31, d_out)
    bias[:2] = [-(1 << 31), (1 << 31) - 1]
    mult = rng.integers(0, 1 << 16, d_out)
    shift = rng.integers(0, 256, d_out)
    blob = pack_matrix(w, gs, bias, mult, shift, hw)
    assert len(blob) == hw.matrix_bytes(d_out, d_in) and len(blob) % hw.bus_bytes == 0
    got = unpack_matrix(blob, d_out, d_in, hw)
    assert np.array_equal(got["w"], w) and np.array_equal(got["bias"], bias)
    assert np.array_equal(got["mult"], mult) and np.array_equal(got["shift"], shift)
    if weights == "int4":
        assert np.array_equal(got["group_scale"], gs)
    else:
        assert got["group_scale"] is None


def test_pack_int8_bytes_by_hand():
    # one row, d_in 3, 64-bit beats: header beat = bias -1 (ff ff ff ff), mult 0x1234 (34 12), shift 5, reserved 0;
    # weight beat = 01 fe 03 then zero padding to 8 bytes
    blob = pack_matrix([[1, -2, 3]], None, [-1], [0x1234], [5], HwLayout(bus_bits=64))
    assert blob == bytes.fromhex("ffffffff34120500" "01fe030000000000")


def test_pack_int4_bytes_by_hand():
    # d_in 5, group 32 -> 1 group scale (200 = c8) after the 8 fixed bytes: 9 bytes -> 2 beats of 8;
    # weights two per byte, low nibble first: (1, -1) -> f1, (7, -8) -> 87, (5, pad 0) -> 05; one beat
    blob = pack_matrix([[1, -1, 7, -8, 5]], [[200]], [258], [1], [47], HwLayout(bus_bits=64, weights="int4"))
    assert blob == bytes.fromhex("02010000" "0100" "2f00" "c800000000000000" "f187050000000000")
    # 128-bit beats: header fits one 16-byte beat, the 5 nibbles one 16-byte beat
    blob = pack_matrix([[1, -1, 7, -8, 5]], [[200]], [258], [1], [47], HwLayout(bus_bits=128, weights="int4"))
    assert blob == bytes.fromhex("020100000100" "2f00" "c8" + "00" * 7 + "f18705" + "00" * 13)


# ---- (d) an independent re-implementation of the forward pass -----------------------------------
def rshift(x: int, s: int) -> int:  # floor((x + 2**(s-1)) / 2**s), shift 0 is the identity
    return x if s == 0 else (x + (1 << (s - 1))) >> s


def sat(x: int, bits: int) -> int:
    return max(-(1 << (bits - 1)), min((1 << (bits - 1)) - 1, x))


def requant(acc: int, mult: int, shift: int, bits: int) -> int:
    return sat(rshift(acc * mult, shift), bits)


# tables rebuilt from the docstring formulas (round = floor(x + 0.5))
RSQRT = [math.floor(2 ** 23 / math.sqrt((i + 256) * 64 + 32) + 0.5) for i in range(768)]
EXP2 = [math.floor(2 ** 15 * 2 ** (-f / 256) + 0.5) for f in range(256)]
RECIP = [math.floor(2 ** 31 / ((i + 1024) * 32 + 16) + 0.5) for i in range(1024)]


def test_tables_match_their_docstring_formulas():
    assert nx.RSQRT_TABLE.tolist() == RSQRT and nx.EXP2_TABLE.tolist() == EXP2 and nx.RECIP_TABLE.tolist() == RECIP
    assert 1 << 15 <= min(RSQRT) and max(RSQRT) < 1 << 16  # documented ranges
    assert 1 << 14 < min(EXP2) and max(EXP2) == 1 << 15
    assert 1 << 15 <= min(RECIP) and max(RECIP) < 1 << 16


def parse_rows(blob, d_out: int, d_in: int, hw: dict):
    """Rows (w_eff list, bias, mult, shift) read from raw bytes as layout.py's module docstring describes."""
    B, int4, group = hw["bus_bits"] // 8, hw["weights"] == "int4", hw["group"]
    n_groups = -(-d_in // group) if int4 else 0
    hb = -(-(8 + n_groups) // B) * B
    wb = -(-d_in // (2 * B if int4 else B)) * B
    raw = bytes(blob)
    assert len(raw) == d_out * (hb + wb)
    rows = []
    for o in range(d_out):
        r = raw[o * (hb + wb):(o + 1) * (hb + wb)]
        bias, mult, shift, reserved = struct.unpack_from("<iHBB", r, 0)
        assert reserved == 0 and all(b == 0 for b in r[8 + n_groups:hb])  # padding is zero
        body = r[hb:]
        if int4:
            scales = list(r[8:8 + n_groups])
            w = []
            for i in range(d_in):
                nib = body[i // 2] & 0xF if i % 2 == 0 else body[i // 2] >> 4
                w.append((nib - 16 if nib >= 8 else nib) * scales[i // group])
            assert all(b == 0 for b in body[(d_in + 1) // 2:])
        else:
            w = [b - 256 if b >= 128 else b for b in body[:d_in]]
            assert all(b == 0 for b in body[d_in:])
        rows.append((w, bias, mult, shift))
    return rows


def ref_matvec(rows, a: list[int], bits: int) -> list[int]:
    return [requant(bias + sum(wi * ai for wi, ai in zip(w, a)), mult, shift, bits) for w, bias, mult, shift in rows]


def ref_input_shift(x: list[int]) -> int:
    """LayerNorm step 1 as docs/numerics.md defines it, sh = max(0, bit_length(max|x|) - 15), read as:
    the smallest sh >= 0 that leaves every magnitude within 15 bits, |x| < 2**(15 + sh). Then every
    x >> sh fits int16; it is not the smallest shift that does for a peak of exactly -2**(15 + k):
    -32768 fits int16 as it is, but its magnitude 2**15 needs sh = 1."""
    sh = 0
    while any(abs(v) >= 1 << (15 + sh) for v in x):
        sh += 1
    return sh


def ref_layernorm(x: list[int], ln_blob, out_shift: int, eps: list[int]) -> list[int]:
    d = len(x)
    words = [struct.unpack_from("<h2xi", bytes(ln_blob), 8 * i) for i in range(d)]  # gamma bits 15:0, beta 63:32
    sh = ref_input_shift(x)
    xs = [v >> sh for v in x]
    S, Q = sum(xs), sum(v * v for v in xs)
    c = [d * v - S for v in xs]
    u = d * Q - S * S + eps[sh]
    t, m = 0, u  # normalise by an even shift 2t into [2**14, 2**16)
    while m >= 1 << 16:
        t, m = t + 1, u >> (2 * (t + 1))
    while m < 1 << 14:
        t, m = t - 1, u << (-2 * (t - 1))
    y = RSQRT[(m >> 6) - 256]  # top 10 bits of the 16-bit mantissa
    out = []
    for ci, (g, b) in zip(c, words):
        n = rshift(ci * y, 23 + t - 10)
        out.append(sat(rshift(n * g + b, out_shift), 8))
    return out


def ref_softmax(scores: list[int], visible: list[bool], mult: int, shift: int) -> list[int]:
    if not any(visible):
        return [0] * len(scores)
    z = [requant(s, mult, shift, 32) for s in scores]
    zmax = max(zi for zi, v in zip(z, visible) if v)
    e = [EXP2[(zmax - zi) & 255] >> min((zmax - zi) >> 8, 16) if v else 0 for zi, v in zip(z, visible)]
    S = sum(e)
    k = S.bit_length()
    r = RECIP[((S >> (k - 16)) >> 5) - 1024]
    return [rshift(ei * r, k) for ei in e]


class RefModel:
    """The accelerator's forward pass from the docstrings, plain Python ints, reading raw section bytes."""

    def __init__(self, image):
        self.h = image.header
        self.image = image
        c = self.h["config"]
        self.d, self.nh, self.v = c["d_model"], c["n_head"], c["vocab_size"]
        self.hd, self.f = self.d // self.nh, c["d_ff"]
        self.eps = self.h["ln_eps_table"]
        hw = self.h["hardware"]
        self.mats = {}
        for i in range(c["n_layer"]):
            for name, o, n_in in layer_matrices(image_cfg(image)):
                self.mats[(i, name)] = parse_rows(image.section(f"L{i}.{name}"), o, n_in, hw)
        self.head = parse_rows(image.section("lm_head"), self.v, self.d, hw)
        self.stats = {"softmax_rows": 0, "spread_rows": 0}

    def embed(self, ids: list[int]) -> list[list[int]]:
        emb = bytes(self.image.section("embed_scale"))
        wpe = bytes(self.image.section("wpe"))
        out = []
        for pos, tok in enumerate(ids):
            mult, shift = struct.unpack_from("<HB", emb, 4 * tok)
            w = self.head[tok][0]
            out.append([sat(requant(w[e], mult, shift, 32) + struct.unpack_from("<i", wpe, 4 * (pos * self.d + e))[0],
                            32) for e in range(self.d)])
        return out

    def block(self, xs: list[list[int]], i: int) -> list[list[int]]:
        L, d, hd = self.h["layers"][i], self.d, self.hd
        gelu = [b - 256 if b >= 128 else b for b in bytes(self.image.section(f"L{i}.gelu"))]
        a = [ref_layernorm(x, self.image.section(f"L{i}.ln1"), L["ln1_shift"], self.eps) for x in xs]
        qkv = [ref_matvec(self.mats[(i, "qkv")], ai, 8) for ai in a]
        n = len(xs)
        ctx = [[0] * d for _ in range(n)]
        for hh in range(self.nh):
            q = [[qkv[p][hh * hd + e] for e in range(hd)] for p in range(n)]
            k = [[qkv[p][d + hh * hd + e] for e in range(hd)] for p in range(n)]
            v = [[qkv[p][2 * d + hh * hd + e] for e in range(hd)] for p in range(n)]
            for p in range(n):
                vis = [j <= p and (L["window"] == 0 or p - j < L["window"]) for j in range(n)]
                s = [sum(qe * ke for qe, ke in zip(q[p], k[j])) for j in range(n)]
                prob = ref_softmax(s, vis, L["score_mult"], L["score_shift"])
                self.stats["softmax_rows"] += 1
                self.stats["spread_rows"] += sum(1 for x in prob if x) > 1
                for e in range(hd):
                    acc = sum(prob[j] * v[j][e] for j in range(n))
                    ctx[p][hh * hd + e] = requant(acc, L["ctx_mult"], L["ctx_shift"], 8)
        x1 = [[sat(xv + yv, 32) for xv, yv in zip(x, ref_matvec(self.mats[(i, "attn_out")], c_, 32))]
              for x, c_ in zip(xs, ctx)]
        a2 = [ref_layernorm(x, self.image.section(f"L{i}.ln2"), L["ln2_shift"], self.eps) for x in x1]
        g = [[gelu[fv + 128] for fv in ref_matvec(self.mats[(i, "fc")], ai, 8)] for ai in a2]
        return [[sat(xv + yv, 32) for xv, yv in zip(x, ref_matvec(self.mats[(i, "proj")], gi, 32))]
                for x, gi in zip(x1, g)]

    def logits(self, xs):
        a = [ref_layernorm(x, self.image.section("lnf"), self.h["lnf_shift"], self.eps) for x in xs]
        return [ref_matvec(self.head, ai, 32) for ai in a]


def image_cfg(image):
    from gpt_fpga.contract.config import ModelConfig

    return ModelConfig.from_dict(image.header["config"])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_independent_reimplementation(tiny_images, variant):
    im = read_image(tiny_images[variant])
    ids = (IDS * 3)[:N_CTX - 8]
    ref, m = RefModel(im), FixedModel(im)
    x_ref = ref.embed(ids)
    x = m.embed(np.array(ids), 0)
    assert x.tolist() == x_ref, "embedding"
    for layer in range(LAYERS):
        x = m.block(x, layer, 0)
        x_ref = ref.block(x_ref, layer)
        assert x.tolist() == x_ref, f"layer {layer}"
    assert m.lnf(x, m.eps_table).tolist() == [
        ref_layernorm(r, im.section("lnf"), im.header["lnf_shift"], ref.eps) for r in x_ref]
    assert m.head(m.lnf(x, m.eps_table), nx.RESID_BITS).tolist() == ref.logits(x_ref)
    m.reset()
    assert m.forward_int(ids).tolist() == ref.logits(x_ref)
    # the case exercised real attention (probability spread over several keys), not a degenerate one
    assert ref.stats["spread_rows"] > ref.stats["softmax_rows"] // 2


# the input-shift edge rows: peaks that are negative powers of two, where "fits int16" and "magnitude
# fits 15 bits" part ways, and the most negative residual (residual_add saturates to it)
SHIFT_EDGE_ROWS = [
    ([-32768, 5, 7], 1),         # |-32768| = 2**15 is not < 2**15, and < 2**16: sh 1 (-32768 >> 1 = -16384)
    ([-65536, 100], 2),          # 2**16 >= 2**16, < 2**17: sh 2 (-65536 >> 2 = -16384; sh 1 would give -32768)
    ([-(1 << 31), 0, 5, -7], 17),  # 2**31 >= 2**31, < 2**32: sh 17, the last of the 18 eps entries
    ([-32767, 32767], 0),        # 2**15 - 1 < 2**15: no shift
    ([32768, -3], 1),            # 2**15 does not fit int16 either way: sh 1
    ([0, 0, 0], 0),
]


@pytest.mark.parametrize("row, want", SHIFT_EDGE_ROWS)
def test_layernorm_input_shift_edge_rows(row, want):
    assert ref_input_shift(row) == want
    assert int(nx.layernorm_input_shift(np.array([row]))[0]) == want
    assert all(-(1 << 15) <= v >> want < 1 << 15 for v in row)  # the shifted row fits int16


@pytest.mark.parametrize("variant", ["gpt2-int8-b64", "neo-int4-g64-b64"])
def test_independent_layernorm_on_edge_rows(tiny_images, variant):
    """The reference LayerNorm equals the fixed model's on the edge rows too (padded to d with small
    values), where a different input shift would read a different eps entry and round differently."""
    im = read_image(tiny_images[variant])
    m, eps = FixedModel(im), im.header["ln_eps_table"]
    d = image_cfg(im).d_model
    rows = [row + [(-1) ** i * (3 * i + 1) for i in range(d - len(row))] for row, _ in SHIFT_EDGE_ROWS]
    rows.append([-(1 << 31)] + [(1 << 31) - 1] * (d - 1))
    want = [ref_layernorm(r, im.section("lnf"), im.header["lnf_shift"], eps) for r in rows]
    assert m.lnf(np.array(rows, dtype=np.int64), m.eps_table).tolist() == want


# ---- (e) quantizer output ranges ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_image_integer_ranges(tiny_images, variant):
    im = read_image(tiny_images[variant])
    cfg, hw = image_cfg(im), im.hw
    mats = [(f"L{i}.{n}", o, k) for i in range(cfg.n_layer) for n, o, k in layer_matrices(cfg)]
    mats.append(("lm_head", cfg.vocab_size, cfg.d_model))
    for name, o, k in mats:
        m = unpack_matrix(im.section(name), o, k, hw)
        if hw.weights == "int4":
            assert m["w"].min() >= -7 and m["w"].max() <= 7, name  # -8 is never produced
            assert m["group_scale"].min() >= 1 and m["group_scale"].max() <= 255, name
            assert m["group_scale"].shape == (o, -(-k // hw.group))
            # nearest: each row's largest group uses the full scale, or 0.95 / 0.9 of it after the group-peak
            # search (docs/numerics.md), q >= ceil(255 * 0.9) = 230; gptq picks scales from updated weights
            if im.header["rounding"]["method"] == "nearest":
                assert (m["group_scale"].max(axis=1) >= 230).all(), name
        else:
            assert m["w"].min() >= -127 and m["w"].max() <= 127, name
            assert (np.abs(m["w"]).max(axis=1) == 127).all(), name  # per-row scale: every row reaches 127
        assert (m["mult"] < 1 << 15).all() and (m["shift"] <= nx.MAX_SHIFT).all(), name
        assert ((m["mult"] >= 1 << 14) | (m["shift"] == nx.MAX_SHIFT)).all(), name
        assert (np.abs(m["bias"]) <= nx.MAX_BIAS).all(), name
    for L in im.header["layers"]:
        for key in ("score", "ctx"):
            assert 1 << 14 <= L[f"{key}_mult"] < 1 << 15 and 0 <= L[f"{key}_shift"] <= nx.MAX_SHIFT
    assert len(im.header["ln_eps_table"]) == nx.LN_MAX_SHIFT + 1


# ---- (f) quantize command: calibration and options -----------------------------------------------
def test_quantize_self_generated_calibration(capsys, tmp_path):
    model = write_tiny_model(tmp_path / "m", "gpt2")
    rc, out, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "a.img", "--calib-tokens", "16")
    assert rc == 0, err
    assert "no --calib text given" in err and "self-generated" in err and "16 tokens" in err
    assert "(self-generated)" in err.strip().splitlines()[-1]
    cal = read_image(tmp_path / "a.img").header["calibration"]
    assert cal["source"] == "self-generated" and cal["tokens"] == 16


def test_quantize_calib_file(capsys, tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text((MODELS / "kjv-heldout.txt").read_text()[:4000])
    rc, out, err = run_cli(capsys, "quantize", tiny_dir, "-o", tmp_path / "b.img", "--calib", text,
                           "--calib-tokens", "64")
    assert rc == 0, err
    assert "self-generated" not in err
    assert f"calibrated on 64 tokens ({text})" in err
    assert read_image(tmp_path / "b.img").header["calibration"] == {"source": str(text), "tokens": 64,
                                                                     "method": "absmax"}


def test_quantize_calib_file_too_short(capsys, tiny_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("In the beginning")
    rc, out, err = run_cli(capsys, "quantize", tiny_dir, "-o", tmp_path / "c.img", "--calib", text)
    assert rc == 2 and not (tmp_path / "c.img").exists()
    assert err.startswith("gpt-fpga: error: ") and str(text) in err and "calibration needs at least 16" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, needle", [
    (["--calib", "/nonexistent/calib.txt"], "--calib /nonexistent/calib.txt: no such text file"),
    (["--calib-tokens", "8"], "--calib-tokens must be >= 16"),
])
def test_quantize_cli_refusals(capsys, tiny_dir, tmp_path, argv, needle):
    rc, out, err = run_cli(capsys, "quantize", tiny_dir, "-o", tmp_path / "d.img", *argv)
    assert rc == 2 and needle in err and "Traceback" not in err, err


def test_quantize_output_is_a_directory(capsys, tiny_dir, tmp_path):
    rc, out, err = run_cli(capsys, "quantize", tiny_dir, "-o", tmp_path)
    assert rc == 2 and "is a directory" in err and "Traceback" not in err, err


def test_quantize_creates_missing_output_folders(capsys, tiny_dir, tmp_path):
    target = tmp_path / "new" / "deeper" / "e.img"
    rc, out, err = run_cli(capsys, "quantize", tiny_dir, "-o", target, "--calib-tokens", "16")
    assert rc == 0, err
    assert read_image(target).header["config"]["vocab_size"] > 0


def test_quantize_calib_tokens_outside_the_model_vocab_do_not_count(capsys, tmp_path):
    """Ids the model cannot embed are dropped *before* the 16-token minimum is checked.

    Regression: the check used to run first, so a text whose ids all exceed the model's vocabulary
    calibrated on 0 tokens (every activation scale 1e-6 / 127) without a word.
    """
    import shutil

    model = write_tiny_model(tmp_path / "m", "gpt2")  # vocab 64 with the 4096-id KJV tokenizer
    shutil.copy(MODELS / "gpt2-kjv" / "tokenizer.json", model / "tokenizer.json")
    text = tmp_path / "long-words.txt"
    text.write_text("righteousness " * 200)  # BPE ids 1164 etc., all >= 64
    rc, out, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "v.img", "--calib", text)
    assert rc == 2 and "only 0 token(s) in the model's vocabulary; calibration needs at least 16" in err, err
    assert not (tmp_path / "v.img").exists()


def test_quantize_calib_needs_tokenizer(capsys, tmp_path):
    model = write_tiny_model(tmp_path / "m", "gpt2")  # no tokenizer.json
    text = tmp_path / "t.txt"
    text.write_text("And God said, Let there be light: and there was light. " * 10)
    rc, out, err = run_cli(capsys, "quantize", model, "-o", tmp_path / "e.img", "--calib", text)
    assert rc == 2 and "no tokenizer.json" in err, err


def test_quantize_cli_rejects_group_48(capsys, tiny_dir, tmp_path):
    with pytest.raises(SystemExit) as e:  # argparse choices
        main(["quantize", str(tiny_dir), "-o", str(tmp_path / "f.img"), "--weights", "int4", "--group", "48"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("kw, needle", [
    (dict(weights="int4", group=48), "--group must be one of"),
    # the flag and its choices (either wording: quantizer.py's messages are being reworded)
    (dict(weights="int2"), "--weights must be (int8 or int4|one of int8, int4)"),
    (dict(bus_bits=96), "--bus-bits must be (64 or 128|one of 64, 128)"),
])
def test_quantize_api_refuses_unsupported_options(tmp_path, kw, needle):
    model = write_tiny_model(tmp_path / "m", "gpt2")
    with pytest.raises(InputError, match=needle):
        quantize_checkpoint(model, tmp_path / "g.img", calib_tokens=16, progress=False, **kw)
    assert not (tmp_path / "g.img").exists()


# ---- (c) neo-kjv int8: fixed generates what float generates ------------------------------------------
def test_neo_kjv_int8_greedy_matches_float(capsys, tmp_path):
    from gpt_fpga.host.backends import open_backend
    from gpt_fpga.host.generate import generate

    img = tmp_path / "neo-int8.img"
    rc, out, err = run_cli(capsys, "quantize", MODELS / "neo-kjv", "-o", img, "--weights", "int8",
                           "--calib", MODELS / "kjv-heldout.txt")
    assert rc == 0, err
    prompt = "And God said"
    texts = {}
    for backend, target in (("fixed", img), ("float", MODELS / "neo-kjv")):
        rc, out, err = run_cli(capsys, "generate", target, "--backend", backend, "--prompt", prompt,
                               "--max-new-tokens", "8")
        assert rc == 0, err
        texts[backend] = out
    assert texts["fixed"].startswith(prompt) and texts["fixed"] == texts["float"]
    # the same at the token level
    fx, fl = open_backend("fixed", img), open_backend("float", MODELS / "neo-kjv")
    ids = fl.codec.encode(prompt)
    assert generate(fx, ids, 8) == generate(fl, ids, 8)


@pytest.mark.parametrize("field, value, needle", [
    ("vocab_size", 65536, "vocab_size=65536"),  # the matvec core's n_rows is 16 bits: 65535 rows at most
    ("n_ctx", 4096, "n_ctx=4096"),              # the softmax core holds rows of up to 2048 scores
    ("d_ff", 8192, "d_ff=8192"),                # matvec inputs are at most 4096
])
def test_quantizer_refuses_configs_beyond_the_engine(field, value, needle):
    import dataclasses

    from gpt_fpga.contract.config import parse_config
    from gpt_fpga.quantize.quantizer import QuantOptions
    from gpt_fpga.sim.random_checkpoint import make_config

    cfg = dataclasses.replace(parse_config(make_config("gpt2", vocab=64, d=32, heads=2, layers=1, n_ctx=32)),
                              **{field: value})
    with pytest.raises(InputError, match=needle):
        QuantOptions().validate(cfg)
