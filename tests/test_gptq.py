"""Error-compensating (GPTQ) rounding in the quantizer (quantize/gptq.py; issue 15).

The expected integers and errors come from constructions worked out by hand below, or from nearest
rounding (quantize_rows_int8/int4, the reference the method must reduce to), never from the code
under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gpt_fpga.contract import numerics as nx
from gpt_fpga.contract.errors import ImageError
from gpt_fpga.contract.image import ROUNDING_METHODS, read_image, write_image
from gpt_fpga.contract.layout import GROUP_CHOICES, HwLayout, unpack_matrix
from gpt_fpga.host.cli import main
from gpt_fpga.quantize.gptq import compensation_factor, hessian, inverse_cholesky, weighted_error
from gpt_fpga.quantize.quantizer import (gptq_rows_int4, gptq_rows_int8, quantize_checkpoint, quantize_rows_int4,
                                         quantize_rows_int8)
from gpt_fpga.sim.fixed_model import FixedModel
from gpt_fpga.sim.random_checkpoint import make_config, random_tensors, write_checkpoint


def dequant4(w4, q, base, group):  # -> [o, i] real weights
    return nx.expand_int4(w4, q, group) * base[:, None]


def correlated_acts(n_tokens: int, d_in: int, seed: int = 0) -> np.ndarray:  # [t, i] int8, strongly correlated
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_tokens, 8)) @ rng.standard_normal((8, d_in))
    x = latent + 0.3 * rng.standard_normal((n_tokens, d_in))
    return np.clip(np.round(x / np.abs(x).max() * 127), -127, 127)


def outlier_weights(o: int, i: int, seed: int = 1) -> np.ndarray:  # [o, i] with a few large entries
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((o, i)) * 0.02
    w[rng.random((o, i)) < 0.01] *= 20
    return w


# ---- the method on one matrix -----------------------------------------------------------------
@pytest.mark.parametrize("group", GROUP_CHOICES)
def test_identity_hessian_without_damping_is_nearest_rounding_int4(group):
    w = outlier_weights(48, 256)
    u, used = compensation_factor(np.eye(256), damping=0.0)
    assert used == 0.0 and np.array_equal(u, np.eye(256))
    got, ref = gptq_rows_int4(w, group, u), quantize_rows_int4(w, group)
    for a, b in zip(got, ref):
        assert np.array_equal(a, b)
    assert not np.array_equal(got[1], quantize_rows_int4(w, group, scale_search=False)[1])  # the peaks were tried


def test_identity_hessian_without_damping_is_nearest_rounding_int8():
    w = outlier_weights(48, 256)
    got, ref = gptq_rows_int8(w, compensation_factor(np.eye(256), damping=0.0)[0]), quantize_rows_int8(w)
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[1], ref[1])


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-6), (np.float32, 1e-3)])
def test_inverse_cholesky_factors_the_inverse(dtype, atol):
    x = correlated_acts(600, 300)
    h = hessian(x) + 0.01 * np.eye(300) * np.mean(np.diag(hessian(x)))
    u = inverse_cholesky(h, dtype)
    assert u.dtype == dtype and not np.tril(u, -1).any()
    assert np.all(np.diag(u) > 0)
    assert np.allclose(u.astype(np.float64).T @ u @ h, np.eye(300), atol=atol)


def test_hessian_is_exact_over_many_tokens():
    """int8 extremes over more tokens than one float32 partial sum holds exactly: H is still exact."""
    x = np.full((3000, 3), -128)
    x[:, 1] = 127
    x[:, 2] = 0
    x[::2, 2] = 1
    h = hessian(x)
    assert h[0, 0] == 3000 * 128 ** 2 and h[0, 1] == -3000 * 128 * 127 and h[2, 2] == 1500
    assert h[1, 2] == 1500 * 127


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_weighted_error_at_most_nearest(weights):
    """On correlated inputs, compensation lowers e^T H e well below nearest rounding's."""
    d_in = 128
    h = hessian(correlated_acts(512, d_in))
    w = outlier_weights(32, d_in)
    u, _ = compensation_factor(h)
    if weights == "int8":
        (w8, s), (n8, s_near) = gptq_rows_int8(w, u), quantize_rows_int8(w)
        got, near = w8 * s[:, None], n8 * s_near[:, None]
    else:
        got, near = dequant4(*gptq_rows_int4(w, 32, u), 32), dequant4(*quantize_rows_int4(w, 32), 32)
    assert weighted_error(w, got, h) < 0.7 * weighted_error(w, near, h)


def test_compensation_must_help_on_two_identical_inputs():
    """Inputs 0 and 1 are always equal. Row: w0 = w1 = 0.4 step, w2 = 7 steps (sets the scale), rest 0.

    Nearest rounds w0 and w1 to 0: output error 0.8 step * x. Compensation rounds w0 to 0 and carries
    its 0.4 step onto w1 (the same input), which becomes ~0.8 step and rounds to 1: error 0.2 step * x.
    """
    rng = np.random.default_rng(0)
    x = np.clip(np.round(rng.standard_normal((256, 32)) * 40), -127, 127)
    x[:, 1] = x[:, 0]
    h = hessian(x)
    step = 1.0 / 7  # w2 = 1.0 is the row peak: base = 1 / (7 * 255), q = 255 in this group
    w = np.zeros((1, 32))
    w[0, :3] = 0.4 * step, 0.4 * step, 1.0
    w4, q, base = gptq_rows_int4(w, 32, compensation_factor(h)[0])
    n4, nq, nbase = quantize_rows_int4(w, 32)
    assert n4[0, :3].tolist() == [0, 0, 7] and q[0, 0] == nq[0, 0] == 255
    assert w4[0, :3].tolist() == [0, 1, 7] and not w4[0, 3:].any()
    err_near = weighted_error(w, dequant4(n4, nq, nbase, 32), h)
    err_comp = weighted_error(w, dequant4(w4, q, base, 32), h)
    assert np.isclose(err_near, (0.8 * step) ** 2 * h[0, 0])
    assert np.isclose(err_comp, (0.2 * step) ** 2 * h[0, 0])


@pytest.mark.parametrize("group", GROUP_CHOICES)
def test_stored_integers_in_range_under_large_updates(group):
    """Few tokens, nearly collinear inputs and huge outliers push updates far past the row peaks."""
    x = correlated_acts(40, 256, seed=3)
    w = outlier_weights(64, 256, seed=4) * np.where(np.random.default_rng(5).random(256) < 0.05, 50, 1)
    u, _ = compensation_factor(hessian(x), damping=0.0)
    w4, q, base = gptq_rows_int4(w, group, u)
    assert w4.min() >= -nx.INT4_MAX and w4.max() <= nx.INT4_MAX
    assert q.min() >= 1 and q.max() <= nx.GROUP_SCALE_MAX and q.shape == (64, 256 // group)
    w8, s = gptq_rows_int8(w, u)
    assert w8.min() >= -127 and w8.max() <= 127 and np.all(np.isfinite(s))


# ---- degenerate cases -------------------------------------------------------------------------
def test_dead_input_channel_is_rounded_to_nearest():
    x = correlated_acts(512, 64)
    x[:, 5] = 0  # input 5 is zero on every calibration token: its H row, column and diagonal are 0
    w = outlier_weights(16, 64)
    u, used = compensation_factor(hessian(x))
    assert np.all(np.isfinite(u)) and used == 0.01
    assert not u[5, 6:].any() and not u[:5, 5].any()  # it neither passes nor receives error
    w8, _ = gptq_rows_int8(w, u)
    near, _ = quantize_rows_int8(w)
    assert np.array_equal(w8[:, :6], near[:, :6])  # columns 0..4 only pass error to later ones, and 5 is alone


def test_singular_hessian_without_damping_raises_it():
    """Fewer tokens than inputs: H is singular; with no damping the factor fails and damping is raised."""
    x = correlated_acts(8, 64)
    u, used = compensation_factor(hessian(x), damping=0.0)
    assert used is not None and used > 0 and np.all(np.isfinite(u))
    w4, q, _ = gptq_rows_int4(outlier_weights(8, 64), 32, u)
    assert np.abs(w4).max() <= nx.INT4_MAX


def test_all_zero_hessian_is_nearest_rounding():
    u, used = compensation_factor(np.zeros((64, 64)))
    w = outlier_weights(8, 64)
    assert used is not None
    assert np.array_equal(gptq_rows_int8(w, u)[0], quantize_rows_int8(w)[0])


def test_non_finite_hessian_falls_back_to_nearest():
    h = hessian(correlated_acts(100, 32))
    h[3, 4] = h[4, 3] = np.nan
    u, used = compensation_factor(h)
    assert used is None and np.array_equal(u, np.eye(32))


def test_all_zero_column_and_all_equal_group():
    x = correlated_acts(512, 64)
    w = outlier_weights(4, 64)
    w[:, 7] = 0.0  # all-zero column
    w[0, :32] = 0.03  # row 0: a group whose weights are all equal (and the row's peak is elsewhere)
    w[1, :] = 0.0  # an all-zero row
    w[2, 32:] = -0.05  # a whole group equal and the row's peak
    w4, q, base = gptq_rows_int4(w, 32, compensation_factor(hessian(x))[0])
    assert np.all(np.isfinite(base)) and not w4[1].any()
    assert np.abs(w4).max() <= nx.INT4_MAX and q.min() >= 1
    # a group of equal weights that is the row's peak sits exactly on level -7 with q = 255: error 0,
    # so nothing is carried within it
    assert q[2, 1] == 255 and np.all(w4[2, 32:] == -7)


# ---- images, header and command line ----------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    cfg = make_config("gpt2", vocab=64, d=64, heads=2, layers=2, n_ctx=32)
    return write_checkpoint(tmp_path_factory.mktemp("gptq") / "tiny", cfg, random_tensors(cfg, seed=0))


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("weights,expected", [("int4", "gptq"), ("int8", "nearest")])
def test_default_rounding_recorded(tiny_model, tmp_path, capsys, weights, expected):
    img = tmp_path / "x.img"
    code, _, err = run_cli(capsys, "quantize", str(tiny_model), "-o", str(img), "--weights", weights,
                           "--calib-tokens", "48")
    assert code == 0 and f"{expected} rounding" in err
    r = read_image(img).header["rounding"]
    assert r["method"] == expected
    if expected == "gptq":
        assert r == {"method": "gptq", "lm_head": "gptq", "damping": 0.01, "lm_head_damping": 0.3,
                     "calib_tokens": 48, "damping_raised": {}}


@pytest.mark.parametrize("rounding", ROUNDING_METHODS)
def test_rounding_flag_header_and_info(tiny_model, tmp_path, capsys, rounding):
    img = tmp_path / f"{rounding}.img"
    code, _, _ = run_cli(capsys, "quantize", str(tiny_model), "-o", str(img), "--weights", "int8",
                         "--rounding", rounding, "--calib-tokens", "40")
    assert code == 0
    assert read_image(img).header["rounding"]["method"] == rounding
    code, out, _ = run_cli(capsys, "info", str(img))
    line = next(line for line in out.splitlines() if line.strip().startswith("rounding:"))
    if rounding == "gptq":
        assert "gptq (error-compensating), damping 0.01 of H's mean diagonal, 40 calibration tokens, " \
               "lm_head gptq (damping 0.3)" in line
    else:
        assert line.split(": ", 1)[1] == "nearest"
    code, out, _ = run_cli(capsys, "info", str(img), "--json")
    assert json.loads(out)["image"]["rounding"]["method"] == rounding


def test_bad_rounding_value_refused(tiny_model, tmp_path, capsys):
    code, out, err = run_cli(capsys, "quantize", str(tiny_model), "-o", str(tmp_path / "x.img"),
                             "--rounding", "stochastic")
    assert code == 2 and "--rounding" in err and "stochastic" in err and "Traceback" not in err
    assert not (tmp_path / "x.img").exists()


def test_gptq_image_changes_only_the_integers(tiny_model, tmp_path):
    """Same hardware layout, scales and requantization; the weights differ; the fixed model runs."""
    near, comp = tmp_path / "near.img", tmp_path / "comp.img"
    for path, rounding in ((near, "nearest"), (comp, "gptq")):
        quantize_checkpoint(tiny_model, path, weights="int4", group=32, calib_tokens=64, rounding=rounding,
                            progress=False)
    a, b = read_image(near), read_image(comp)
    assert a.header["layers"] == b.header["layers"] and a.header["hardware"] == b.header["hardware"]
    assert [e["size"] for e in a.header["sections"]] == [e["size"] for e in b.header["sections"]]
    ma, mb = (unpack_matrix(im.section("L1.proj"), 64, 256, im.hw) for im in (a, b))
    assert np.array_equal(ma["mult"], mb["mult"]) and np.array_equal(ma["shift"], mb["shift"])
    assert not np.array_equal(ma["w"], mb["w"])
    logits = FixedModel(b).forward(list(range(20)))
    assert np.all(np.isfinite(logits))


def test_each_matrix_input_observed_with_earlier_matrices_as_stored(tiny_model, tmp_path, monkeypatch):
    """H of a layer's matrix comes from its integer input with the layer's earlier matrices as finally
    stored (gptq-rounded), not as first rounded to nearest: ctx after the stored qkv, the LN2 output
    after the stored attn_out, the GELU output after the stored fc."""
    from gpt_fpga.quantize import quantizer

    seen = []  # (layer, inputs, {matrix: section bytes at the time H was observed})
    original = quantizer.CalibrationRun.hessians

    def spy(self, layer, lh, sections, inputs=tuple(quantizer.MATRIX_INPUTS.values())):
        seen.append((layer, tuple(inputs), {m: sections[f"L{layer}.{m}"] for m in quantizer.MATRIX_INPUTS}))
        return original(self, layer, lh, sections, inputs)

    monkeypatch.setattr(quantizer.CalibrationRun, "hessians", spy)
    near, comp = tmp_path / "near.img", tmp_path / "comp.img"
    for path, rounding in ((near, "nearest"), (comp, "gptq")):
        quantize_checkpoint(tiny_model, path, weights="int4", group=32, calib_tokens=64, rounding=rounding,
                            progress=False)
    a, b = read_image(near), read_image(comp)
    assert [(layer, inputs) for layer, inputs, _ in seen] == [
        (layer, (x,)) for layer in range(2) for x in ("ln1", "ctx", "ln2", "gelu")]
    order = list(quantizer.MATRIX_INPUTS)  # qkv, attn_out, fc, proj: the stream order
    for layer, (x,), sections in seen:
        k = order.index(next(m for m, v in quantizer.MATRIX_INPUTS.items() if v == x))
        for j, m in enumerate(order):  # earlier matrices as stored in the gptq image, the rest nearest
            want = b if j < k else a
            assert sections[m] == want.section(f"L{layer}.{m}"), (layer, x, m)
        assert all(a.section(f"L{layer}.{m}") != b.section(f"L{layer}.{m}") for m in order)


def test_malformed_rounding_field_refused(tiny_model, tmp_path):
    img = tmp_path / "x.img"
    quantize_checkpoint(tiny_model, img, weights="int4", calib_tokens=32, progress=False)
    im = read_image(img)
    header = {k: v for k, v in im.header.items() if k not in ("sections", "data_size", "format_version")}
    sections = {e["name"]: bytes(im.section(e["name"])) for e in im.header["sections"]}
    for bad in ({"method": "gptq", "lm_head": "nearest"}, {"method": "round", "lm_head": "nearest"}, "gptq"):
        write_image(tmp_path / "bad.img", dict(header, rounding=bad), sections)
        with pytest.raises(ImageError, match="header field 'rounding' is malformed"):
            read_image(tmp_path / "bad.img")
    del header["rounding"]  # an image made before the field existed still opens, and info says so
    write_image(tmp_path / "old.img", header, sections)
    assert "rounding" not in read_image(tmp_path / "old.img").header
