"""The quantizer counts every value it saturates or clamps, stores the counts in the image header
("clips"), warns on stderr and `gpt-fpga info` shows them (issue 7).

Tiny GPT-2 checkpoints are written with sim/random_checkpoint.py and edited so that a known number of
entries is out of range; every expected count below comes from that construction (with wide margins
where a calibrated scale is involved), not from the quantizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt_fpga.host.cli import main
from gpt_fpga.quantize.quantizer import QuantOptions, layernorm_params, quantize_matrix, requant_params
from gpt_fpga.contract.config import parse_config
from gpt_fpga.contract.errors import ImageError, InputError
from gpt_fpga.contract.image import read_image, write_image
from gpt_fpga.contract.layout import (BUS_BITS_CHOICES, GROUP_CHOICES, WEIGHT_FORMATS, HwLayout,
                                      unpack_ln_params, unpack_matrix)
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint

D, LAYERS, VOCAB, N_CTX = 32, 2, 64, 32
P = "transformer."
WARN = "gpt-fpga quantize: warning: "

# ---- the construction -------------------------------------------------------------------------
# L0.fc: rows with weights of 1e-6 (a row scale of ~8e-9) and a bias of +-2: round(b / acc_scale) is
# ~1e10 > 2^30 (about 8x over the bound for any input scale below 0.3; the calibrated one is ~0.05).
FC_BIAS_ROWS = {1: 2.0, 5: -2.0, 9: 2.0}
# L0.qkv: v row 0 gets a bias of 1000, so the v scale is ~8; v rows with all-zero weights (and bias)
# keep the 1e-12 row-scale floor, a requantization ratio ~1e-17 << 2^-48: multiplier 0.
V_BIG_BIAS_ROW, V_ZERO_ROWS = 0, (3, 4, 7, 10)
# L1.ln2: gamma 1e-15 everywhere -> gamma shift capped at 36 and every gamma rounds to 0; the output is
# beta, so its scale is 0.5 / 127 and the nonzero betas (0.5 * 127 * 2^46) saturate int32.
LN2_BETA_NONZERO = tuple(range(0, D, 4))
# lnf: gamma 1e-15 and beta 0: the calibrated output peak is ~5e-15 < 1e-6, so its scale is floored
# (gamma_mult is then ~8700: not zero, and beta 0 cannot saturate).
# wpe in residual units (x 2^16): 40000, -1e5 and exactly 32768 saturate; -32768 and 32767 fit.
WPE_EDITS = {(3, 5): 40000.0, (7, 1): -1e5, (10, 2): 32768.0, (11, 2): -32768.0, (12, 2): 32767.0}
EXPECTED = {
    "L0.fc": {"bias": len(FC_BIAS_ROWS)},
    "L0.qkv": {"mult_zero": len(V_ZERO_ROWS)},
    "L1.ln2": {"gamma_zero": D, "beta": len(LN2_BETA_NONZERO)},
    "lnf": {"scale_floor": 1},
    "wpe": {"value": 3},
}


def clipping_tensors() -> dict[str, np.ndarray]:
    cfg = tiny_config()
    t = random_tensors(cfg, seed=0)
    w_fc, b_fc = t[P + "h.0.mlp.c_fc.weight"], t[P + "h.0.mlp.c_fc.bias"]  # GPT-2 Conv1D: [in, out]
    for row, bias in FC_BIAS_ROWS.items():
        w_fc[:, row] = 1e-6
        b_fc[row] = bias
    w_qkv, b_qkv = t[P + "h.0.attn.c_attn.weight"], t[P + "h.0.attn.c_attn.bias"]  # rows: q, k, v
    b_qkv[2 * D + V_BIG_BIAS_ROW] = 1000.0
    for row in V_ZERO_ROWS:
        w_qkv[:, 2 * D + row] = 0.0
        b_qkv[2 * D + row] = 0.0
    t[P + "h.1.ln_2.weight"][:] = 1e-15
    beta = np.zeros(D, np.float32)
    beta[list(LN2_BETA_NONZERO)] = 0.5 * (-1.0) ** np.arange(len(LN2_BETA_NONZERO))
    t[P + "h.1.ln_2.bias"] = beta
    t[P + "ln_f.weight"][:] = 1e-15
    t[P + "ln_f.bias"][:] = 0.0
    for (pos, ch), value in WPE_EDITS.items():
        t[P + "wpe.weight"][pos, ch] = value
    return t


def tiny_config() -> dict:
    return make_config("gpt2", vocab=VOCAB, d=D, heads=2, layers=LAYERS, n_ctx=N_CTX)


def quantize_cli(model: Path, out: Path, capsys, *extra: str) -> str:
    """Run `gpt-fpga quantize` and return its stderr."""
    capsys.readouterr()
    assert main(["quantize", str(model), "-o", str(out), "--calib-tokens", "16", *extra]) == 0
    return capsys.readouterr().err


def info(image: Path, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["info", str(image), *extra]) == 0
    return capsys.readouterr().out


def warnings(stderr: str) -> list[str]:
    return [line[len(WARN):] for line in stderr.splitlines() if line.startswith(WARN)]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    return {"clipping": write_checkpoint(root / "clipping", tiny_config(), clipping_tensors()),
            "normal": write_checkpoint(root / "normal", tiny_config(), random_tensors(tiny_config(), seed=0))}


# ---- a checkpoint made to clip ----------------------------------------------------------------
@pytest.mark.parametrize("weights", WEIGHT_FORMATS)
def test_clip_counts_in_header_and_warnings(models, tmp_path, capsys, weights):
    img = tmp_path / "clip.img"
    err = quantize_cli(models["clipping"], img, capsys, "--weights", weights)
    header = read_image(img).header
    assert header["clips"] == EXPECTED

    lines = warnings(err)
    assert len(lines) == len(EXPECTED) + 1, err
    by_tensor = {line.split(":")[0]: line for line in lines[:-1]}
    assert set(by_tensor) == set(EXPECTED)
    assert by_tensor["L0.fc"].startswith("L0.fc: 3 bias value(s) saturated to +-2^30 accumulator units")
    assert by_tensor["L0.qkv"].startswith("L0.qkv: 4 requantization multiplier(s) rounded to 0")
    assert "always 0" in by_tensor["L0.qkv"]
    assert f"{D} nonzero LayerNorm gamma value(s) rounded to 0" in by_tensor["L1.ln2"]
    assert f"{len(LN2_BETA_NONZERO)} LayerNorm beta value(s) saturated to int32" in by_tensor["L1.ln2"]
    assert by_tensor["lnf"].startswith("lnf: 1 int8 activation scale(s) raised to the floor")
    assert by_tensor["wpe"].startswith("wpe: 3 value(s) saturated to the int32 residual range")
    assert lines[-1].startswith(f"{len(EXPECTED)} tensor(s) clipped during quantization")


def test_clipped_values_in_the_streams(models, tmp_path, capsys):
    """The counted entries are the ones saturated in the image, and nothing else is."""
    img = tmp_path / "clip.img"
    quantize_cli(models["clipping"], img, capsys)
    im = read_image(img)
    fc = unpack_matrix(im.section("L0.fc"), 4 * D, D, im.hw)
    saturated = {int(r): int(b) for r, b in enumerate(fc["bias"]) if abs(b) == 1 << 30}
    assert saturated == {r: int(np.sign(b)) << 30 for r, b in FC_BIAS_ROWS.items()}
    qkv = unpack_matrix(im.section("L0.qkv"), 3 * D, D, im.hw)
    assert sorted(np.flatnonzero(qkv["mult"] == 0) - 2 * D) == list(V_ZERO_ROWS)
    gamma, beta = unpack_ln_params(im.section("L1.ln2"), D)
    assert not gamma.any()
    assert sorted(np.flatnonzero(np.abs(beta) >= (1 << 31) - 1)) == list(LN2_BETA_NONZERO)
    wpe = np.frombuffer(im.section("wpe"), "<i4").reshape(N_CTX, D)
    assert wpe[3, 5] == wpe[10, 2] == (1 << 31) - 1 and wpe[7, 1] == -(1 << 31)
    assert wpe[11, 2] == -(1 << 31) and wpe[12, 2] == 32767 << 16  # in range: not counted
    assert np.count_nonzero(np.abs(wpe.astype(np.int64)) >= (1 << 31) - 1) == 4  # 3 clipped + exact -2^31
    assert im.header["lnf_scale"] == pytest.approx(1e-6 / 127)


def test_info_shows_clip_counts(models, tmp_path, capsys):
    img = tmp_path / "clip.img"
    quantize_cli(models["clipping"], img, capsys)
    out = info(img, capsys)
    lines = out.splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith("clips:"))
    shown = [line.split(":", 1)[1].strip() if n == 0 else line.strip() for n, line in enumerate(lines[first:first + 5])]
    assert sorted(shown) == sorted(["L0.fc: bias 3", "L0.qkv: mult_zero 4", f"L1.ln2: beta {len(LN2_BETA_NONZERO)}, gamma_zero {D}",
                                    "lnf: scale_floor 1", "wpe: value 3"])
    assert json.loads(info(img, capsys, "--json"))["image"]["clips"] == EXPECTED


# ---- a normal checkpoint: nothing clips -------------------------------------------------------
def test_normal_checkpoint_reports_no_clips(models, tmp_path, capsys):
    img = tmp_path / "normal.img"
    err = quantize_cli(models["normal"], img, capsys)
    assert "warning" not in err
    assert read_image(img).header["clips"] == {}
    assert "clips: none" in info(img, capsys)
    assert json.loads(info(img, capsys, "--json"))["image"]["clips"] == {}


# ---- older images and malformed headers -------------------------------------------------------
def rewrite_header(src: Path, dst: Path, edit) -> Path:
    """Copy an image with its JSON header changed by edit(header) (sections and checksums rewritten)."""
    im = read_image(src)
    header = {k: v for k, v in im.header.items() if k not in ("sections", "data_size", "format_version")}
    edit(header)
    sections = {e["name"]: bytes(im.section(e["name"])) for e in im.header["sections"]}
    write_image(dst, header, sections)
    return dst


@pytest.fixture(scope="module")
def normal_image(models, tmp_path_factory) -> Path:
    from gpt_fpga.quantize.quantizer import quantize_checkpoint

    img = tmp_path_factory.mktemp("normal_img") / "normal.img"
    quantize_checkpoint(models["normal"], img, calib_tokens=16, progress=False)
    return img


def test_image_without_clips_reads_as_unknown(normal_image, tmp_path, capsys):
    old = rewrite_header(normal_image, tmp_path / "old.img", lambda h: h.pop("clips"))
    assert "clips" not in read_image(old).header
    assert "clips: unknown" in info(old, capsys)
    assert json.loads(info(old, capsys, "--json"))["image"]["clips"] is None
    capsys.readouterr()
    assert main(["generate", str(old), "--backend", "fixed", "--ids", "1,2", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("clips", [
    [], 3, None, {"L0.fc": 3}, {"L0.fc": {"bias": -1}}, {"L0.fc": {"bias": True}}, {"L0.fc": {"bias": 1.5}},
    {"L0.fc": {"bias": "3"}},
])
def test_malformed_clips_is_refused(normal_image, tmp_path, capsys, clips):
    bad = rewrite_header(normal_image, tmp_path / "bad.img", lambda h: h.update(clips=clips))
    with pytest.raises(ImageError, match="header field 'clips' is malformed"):
        read_image(bad)
    capsys.readouterr()
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt-fpga: error: ") and "'clips'" in err and len(err.splitlines()) == 1


# ---- the counting functions at their exact boundaries -----------------------------------------
def test_bias_saturation_boundary():
    # one input of weight 127 per row: int8 row scale 1, input scale 1 -> acc scale exactly 1
    w = np.zeros((1, 4))
    w[0, :] = 127.0
    bias = np.array([2.0 ** 30, 2.0 ** 30 + 1, -(2.0 ** 30) - 1, -(2.0 ** 30)])
    clips: dict = {}
    blob, _ = quantize_matrix(w, bias, 1.0, 1.0, HwLayout(), clips=clips)
    assert clips == {"bias": 2}
    assert list(unpack_matrix(blob, 4, 1, HwLayout())["bias"]) == [2 ** 30, 2 ** 30, -(2 ** 30), -(2 ** 30)]


def test_multiplier_boundaries():
    # 2^-33: mult 2^14 at shift 47 (full precision); 2^-34 and 2^-48: mult 2^13 and 1 (coarse);
    # 2^-49: mult 0; a ratio of 0 is an exact 0, not a clip
    clips: dict = {}
    mult, shift = requant_params([2.0 ** -33, 2.0 ** -34, 2.0 ** -48, 2.0 ** -49, 0.0, 1.0], clips=clips)
    assert list(mult) == [1 << 14, 1 << 13, 1, 0, 0, 1 << 14]
    assert clips == {"mult_coarse": 2, "mult_zero": 1}


def test_layernorm_gamma_saturation():
    # gamma / s_out of 1e5 and -2e5 exceed int16 even at gamma shift 0; 1.0 and 0.5 fit
    clips: dict = {}
    gamma_mult, beta, out_shift = layernorm_params([1e5, 1.0, -2e5, 0.5], [0.0] * 4, 1.0, clips)
    assert out_shift == 10
    assert list(gamma_mult) == [32767, 1, -32768, 1]
    assert clips == {"gamma": 2}


def test_layernorm_tiny_gamma_and_big_beta():
    # peak gamma 2^-30: the gamma shift would be 44 but stops at 36, so 2^-30 -> 2^6 and 2^-40 -> 0;
    # an exact 0 is not a clip. beta * 2^46 of 1 saturates int32, 2^-16 (2^30) fits.
    clips: dict = {}
    gamma_mult, beta, out_shift = layernorm_params([2.0 ** -30, 2.0 ** -40, 0.0], [1.0, 2.0 ** -16, -1.0], 1.0, clips)
    assert out_shift == 46
    assert list(gamma_mult) == [64, 0, 0]
    assert list(beta) == [(1 << 31) - 1, 1 << 30, -(1 << 31)]
    assert clips == {"gamma_zero": 1, "beta": 2}


def test_counting_is_optional():
    """Without a counts dict the functions behave as before (the benches and old callers pass none)."""
    gamma_mult, _, _ = layernorm_params([1e5], [0.0], 1.0)
    assert list(gamma_mult) == [32767]


# ---- hardware options come from contract/layout.py ----------------------------------------
def test_options_accept_every_layout_choice():
    cfg = parse_config(tiny_config())
    for weights in WEIGHT_FORMATS:
        for group in GROUP_CHOICES:
            for bus in BUS_BITS_CHOICES:
                QuantOptions(weights, group, bus).validate(cfg)
    assert QuantOptions() == QuantOptions(HwLayout().weights, HwLayout().group, HwLayout().bus_bits)


@pytest.mark.parametrize("kw, needle", [
    ({"weights": "int2"}, "--weights must be one of " + ", ".join(WEIGHT_FORMATS) + ", got int2"),
    ({"group": 16}, "--group must be one of " + ", ".join(map(str, GROUP_CHOICES)) + ", got 16"),
    ({"bus_bits": 32}, "--bus-bits must be one of " + ", ".join(map(str, BUS_BITS_CHOICES)) + ", got 32"),
])
def test_options_refuse_values_outside_the_layout(kw, needle):
    with pytest.raises(InputError) as e:
        QuantOptions(**kw).validate(parse_config(tiny_config()))
    assert str(e.value) == needle
