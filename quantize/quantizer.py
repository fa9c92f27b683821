"""Float checkpoint -> fixed-point weight image, following the contract in contract/numerics.py.

Steps: calibrate activation ranges on text (static per-tensor int8 scales), quantize each matrix
(int8 per output channel, or int4 with uint8 group scales), turn every real scale ratio into an
integer (multiplier, shift), and write the streams in the order the hardware reads them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gpt_fpga.quantize.progress import progress as progress_bar

from gpt_fpga.contract.config import ModelConfig

from gpt_fpga.quantize.checkpoint import Checkpoint, load_checkpoint
from gpt_fpga.quantize.text_input import read_text_file
from gpt_fpga.contract.errors import InputError
from gpt_fpga.contract.image import ROUNDING_METHODS, write_image
from gpt_fpga.contract.layout import (BUS_BITS_CHOICES, DEFAULT_GROUP, GROUP_CHOICES, LN_BETA_BITS, LN_GAMMA_BITS, WEIGHT_FORMATS,
                                      HwLayout, ceil_div, pack_embed_scale, pack_ln_params, pack_matrix,
                                      unpack_embed_scale)
from gpt_fpga.contract import numerics as nx
from gpt_fpga.quantize.gptq import DEFAULT_DAMPING, compensation_factor, hessian, round_compensated, row_chunks
from gpt_fpga.sim.fixed_model import FixedModel, LayerNormQ, Matrix, load_layer
from gpt_fpga.sim.float_model import FloatModel

# Activations whose int8 scale is calibrated, per layer (the names FloatModel.forward observes).
CALIBRATED = ("ln1", "q", "k", "v", "ctx", "ln2", "fc", "gelu")
DEFAULT_CALIB_TOKENS = 2048
DEFAULT_SELF_CALIB_TOKENS = 512
DEFAULT_ROUNDING = {"int8": "nearest", "int4": "gptq"}  # chosen by measurement: docs/numerics.md
DEFAULT_HEAD_ROUNDING = "gptq"
# The head's damping also keeps its rows near the float ones, which the embedding (the same rows) needs;
# tuned on held-out text, and validation text did not give a better choice (docs/numerics.md)
DEFAULT_HEAD_DAMPING = 0.3
MAX_DAMPING = 100.0  # lm_head (and the embedding, its rows) under gptq: docs/numerics.md
ACT_SCALE_FLOOR = 1e-6  # smallest calibrated peak an activation scale is made from

# Every saturation or clamp the quantizer can hit, counted per tensor into the image header's
# "clips" ({tensor: {kind: count}}, nonzero counts only; docs/image-format.md). Each kind's phrase
# completes "<tensor>: <count> ..." in the warning printed when a count is above 0.
_GAMMA_BITS, _BETA_BITS = LN_GAMMA_BITS[1] - LN_GAMMA_BITS[0], LN_BETA_BITS[1] - LN_BETA_BITS[0]
_GAMMA_SHIFT_MAX = nx.LN_MAX_OUT_SHIFT - nx.LN_NORM_FRAC  # gamma_mult = round(gamma / s_out * 2^gf), gf <= this
CLIP_KINDS = {
    "bias": f"bias value(s) saturated to +-2^{nx.MAX_BIAS.bit_length() - 1} accumulator units (the bias is too "
            f"large for its row's weight and input scales)",
    "mult_zero": f"requantization multiplier(s) rounded to 0 (scale ratio below 2^-{nx.MAX_SHIFT + 1}): those "
                 f"outputs are always 0",
    "mult_coarse": f"requantization multiplier(s) below 2^{nx.MULT_BITS - 1} at the largest shift {nx.MAX_SHIFT} "
                   f"(scale ratio below 2^{nx.MULT_BITS - 1 - nx.MAX_SHIFT}): fewer than {nx.MULT_BITS} "
                   f"significant bits",
    "gamma": f"LayerNorm gamma value(s) saturated to int{_GAMMA_BITS} (gamma too large for its output scale)",
    "gamma_zero": f"nonzero LayerNorm gamma value(s) rounded to 0 (gamma too small even at the largest gamma "
                  f"shift {_GAMMA_SHIFT_MAX})",
    "beta": f"LayerNorm beta value(s) saturated to int{_BETA_BITS} (beta too large for the output shift)",
    "value": f"value(s) saturated to the int{nx.RESID_BITS} residual range "
             f"(|wpe| >= {2 ** (nx.RESID_BITS - 1 - nx.RESID_FRAC)})",
    "scale_floor": f"int8 activation scale(s) raised to the floor {ACT_SCALE_FLOOR:g}/127 (calibrated peak "
                   f"below {ACT_SCALE_FLOOR:g}): the activation quantizes to few or no nonzero steps",
}


def _count(clips: dict | None, kind: str, n) -> None:
    """Add n clips of `kind` to one tensor's counts (a dict kind -> count), if counting."""
    if clips is not None and int(n):
        clips[kind] = clips.get(kind, 0) + int(n)


def _saturate_counted(x, bits: int, clips: dict | None, kind: str) -> np.ndarray:
    """numerics.saturate(x, bits), counting the entries it changes."""
    x = np.asarray(x)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    _count(clips, kind, np.count_nonzero((x < lo) | (x > hi)))
    return nx.saturate(x, bits)


def clip_warnings(clips: dict) -> list[str]:
    """One stderr line per clipped tensor, then a summary line; [] when nothing clipped."""
    lines = [f"gpt-fpga quantize: warning: {tensor}: "
             + "; ".join(f"{n} {CLIP_KINDS[kind]}" for kind, n in kinds.items())
             for tensor, kinds in clips.items()]
    if lines:
        lines.append(f"gpt-fpga quantize: warning: {len(lines)} tensor(s) clipped during quantization; the counts "
                     f"are in the image header ('clips', shown by 'gpt-fpga info IMAGE')")
    return lines


@dataclass(frozen=True)
class QuantOptions:
    weights: str = HwLayout.weights
    group: int = HwLayout.group
    bus_bits: int = HwLayout.bus_bits
    calib_tokens: int | None = None
    rounding: str | None = None  # None: DEFAULT_ROUNDING of the weight format
    damping: float = DEFAULT_DAMPING
    head_damping: float = DEFAULT_HEAD_DAMPING
    head_rounding: str = DEFAULT_HEAD_ROUNDING

    def validate(self, cfg: ModelConfig):
        for flag, value, choices in (("--weights", self.weights, WEIGHT_FORMATS), ("--group", self.group, GROUP_CHOICES),
                                     ("--bus-bits", self.bus_bits, BUS_BITS_CHOICES),
                                     ("--rounding", self.rounding or "nearest", ROUNDING_METHODS),
                                     ("lm_head rounding", self.head_rounding, ROUNDING_METHODS)):
            if value not in choices:
                raise InputError(f"{flag} must be one of {', '.join(map(str, choices))}, got {value}")
        for what, value in (("damping", self.damping), ("lm_head damping", self.head_damping)):
            if not 0 <= value <= MAX_DAMPING:
                raise InputError(f"{what} must be a multiple of H's mean diagonal in [0, {MAX_DAMPING}], "
                                 f"got {value}")
        for name, d in (("d_model", cfg.d_model), ("d_ff", cfg.d_ff)):
            if d > nx.MAX_D_IN:
                raise InputError(f"{name}={d} exceeds the accelerator's limit of {nx.MAX_D_IN} inputs per matvec")
        for name, rows in (("vocab_size", cfg.vocab_size), ("3 * d_model", 3 * cfg.d_model), ("d_ff", cfg.d_ff)):
            if rows > nx.MAX_ROWS:
                raise InputError(f"{name}={rows} exceeds the matvec core's {nx.MAX_ROWS} output rows per call")
        if nx.layernorm_eps_table(cfg.layer_norm_eps, cfg.d_model)[0] >= 1 << nx.LN_EPS_BITS:
            raise InputError(f"layer_norm_epsilon={cfg.layer_norm_eps} is too large for d_model={cfg.d_model}: "
                             f"the LayerNorm eps table entries must fit {nx.LN_EPS_BITS} bits")
        if cfg.n_ctx > nx.MAX_CONTEXT:
            raise InputError(f"n_ctx={cfg.n_ctx} exceeds the softmax core's row limit of {nx.MAX_CONTEXT} positions")
        if cfg.head_dim > nx.MAX_HEAD_DIM:
            raise InputError(f"head_dim={cfg.head_dim} exceeds the supported {nx.MAX_HEAD_DIM}")


# ---- calibration ------------------------------------------------------------------------------
def self_generated_ids(model: FloatModel, n_tokens: int, seed: int = 0, progress: bool = True) -> list[int]:
    """Default calibration text: sample from the float model itself (temperature 1), no data needed."""
    rng = np.random.default_rng(seed)
    ids, cfg = [], model.cfg
    start = cfg.eos_token_id if cfg.eos_token_id is not None else 0
    with progress_bar(total=n_tokens, desc="calibration text (self-generated)", unit="tok", enabled=progress) as bar:
        while len(ids) < n_tokens:
            model.reset()
            tok = start
            for _ in range(min(cfg.n_ctx - 1, n_tokens - len(ids))):
                z = model.forward([tok])[-1].astype(np.float64)
                p = np.exp(z - z.max())
                tok = int(rng.choice(p.size, p=p / p.sum()))
                ids.append(tok)
                bar.update(1)
    return ids


def calibrate(model: FloatModel, ids: list[int], progress: bool = True) -> dict[str, np.ndarray]:
    """absmax of every calibrated activation over the calibration ids, per layer: name -> [n_layer]."""
    cfg = model.cfg
    peaks = {name: np.zeros(cfg.n_layer + 1) for name in CALIBRATED + ("lnf",)}

    def observe(name, layer, value):
        if name in peaks:
            peaks[name][layer] = max(peaks[name][layer], float(np.max(np.abs(value))))

    chunks = range(0, len(ids), cfg.n_ctx)
    for begin in progress_bar(chunks, desc="calibration", unit="win", enabled=progress):
        model.reset()
        model.forward(ids[begin:begin + cfg.n_ctx], observe=observe)
    return peaks


# ---- weights ----------------------------------------------------------------------------------
def row_absmax(w):  # [o, i] -> [o], without a temporary the size of w
    return np.maximum(w.max(axis=1), -w.min(axis=1))


def quantize_rows_int8(w):  # [o, i] float -> (int8 [o, i], scale [o])
    scale = np.maximum(row_absmax(w), 1e-12) / 127.0
    return np.clip(np.floor(w / scale[:, None] + 0.5), -127, 127).astype(np.int8), scale


SCALE_SEARCH = True
SCALE_SHRINK = (0.95, 0.9)  # group peaks tried below the absmax: clipping can cost less


def quantize_rows_int4(w, group: int, scale_search: bool | None = None):
    """int4 in -7..7 with uint8 group scales q[o, g] relative to a per-row base scale.

    Real weight = w4 * q[o, g] * base[o]. q is chosen first (rounded up so nothing clips), then the
    weights are rounded with the quantized scale, so quantizing the scale costs nothing extra.
    """
    o, i = w.shape
    n_groups = ceil_div(i, group)
    base = int4_row_base(w)
    w4 = np.empty((o, i), np.int8)
    q = np.empty((o, n_groups), np.int64)
    search = SCALE_SEARCH if scale_search is None else scale_search
    for rows in row_chunks(o, i):  # bounded temporaries for a 50257-row lm_head
        padded = np.zeros((rows.stop - rows.start, n_groups * group), np.float64)
        padded[:, :i] = w[rows]
        grouped = padded.reshape(-1, n_groups, group)  # [r, G, g]
        gmax = np.abs(grouped).max(axis=2)  # [r, G]
        # q <= 255 and |w4| <= 7 by construction (the np.clip calls only absorb float rounding): no clip to count
        q[rows] = int4_group_scale(gmax, base[rows])
        if search:
            q[rows] = search_group_scale(grouped, gmax, base[rows], q[rows], np.ones(group))
        step = (q[rows] * base[rows, None])[:, :, None]  # [r, G, 1]
        w4[rows] = np.clip(np.floor(grouped / step + 0.5), -nx.INT4_MAX, nx.INT4_MAX).reshape(-1, n_groups * group)[:, :i]
    return w4, q, base


def int4_row_base(w):  # [o, i] float -> [o]: the row's largest weight is 7 * 255 base steps
    return np.maximum(row_absmax(w), 1e-12) / (nx.INT4_MAX * nx.GROUP_SCALE_MAX)


def int4_group_scale(gmax, base):  # [o, ...] group absmax, [o] base -> uint8 q, rounded up so nothing clips
    base = base.reshape(base.shape + (1,) * (np.ndim(gmax) - 1))
    return np.clip(np.ceil(gmax / (nx.INT4_MAX * base) - 1e-9), 1, nx.GROUP_SCALE_MAX).astype(np.int64)


def search_group_scale(w_group, gmax, base, q, col_weight):  # [o, ..., g], [o, ...], [o], [o, ...], [g] -> [o, ...]
    """The group scale among absmax and SCALE_SHRINK of it with the least weighted squared rounding error."""
    def cost(qc):
        step = (qc * base.reshape(base.shape + (1,) * (qc.ndim - 1)))[..., None]
        err = w_group - np.clip(np.floor(w_group / step + 0.5), -nx.INT4_MAX, nx.INT4_MAX) * step
        return (err * err) @ col_weight

    best, best_cost = q, cost(q)
    for f in SCALE_SHRINK:
        qc = int4_group_scale(gmax * f, base)
        c = cost(qc)
        better = c < best_cost
        best, best_cost = np.where(better, qc, best), np.where(better, c, best_cost)
    return best


def gptq_rows_int8(w, u):  # [o, i] float, U [i, i] -> (int8 [o, i], scale [o]); scales as quantize_rows_int8
    scale = np.maximum(row_absmax(w), 1e-12) / 127.0
    w8, _ = round_compensated(w, u, w.shape[1], lambda _w, _c, rows: scale[rows], -127, 127)
    return w8, scale


def gptq_rows_int4(w, group: int, u, scale_search: bool | None = None):
    """quantize_rows_int4 with error-compensating rounding: (w4 [o, i], q [o, g], base [o]).

    Each group's q follows the same rule, from the group's weights as updated when it is reached
    (compensation can push a weight past the row's original peak: q then saturates at 255 and the
    weight at +-7, which stays within the contract).
    """
    base = int4_row_base(w)
    q = np.empty((w.shape[0], ceil_div(w.shape[1], group)), np.int64)
    search = SCALE_SEARCH if scale_search is None else scale_search

    def step_for(w_group, col_weight, rows):  # [r, g], [g], rows of w -> [r]
        gmax = np.abs(w_group).max(axis=1)
        qg = int4_group_scale(gmax, base[rows])
        if search:
            qg = search_group_scale(w_group, gmax, base[rows], qg, col_weight)
        return qg * base[rows]

    w4, steps = round_compensated(w, u, group, step_for, -nx.INT4_MAX, nx.INT4_MAX)
    q = np.stack([np.rint(s / base) for s in steps], axis=1).astype(np.int64)
    return w4, q, base


def requant_params(ratios, what: str = "a matrix", clips: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mult, shift) arrays from numerics.multiplier_for; counts mult_zero / mult_coarse into `clips`."""
    ratios = np.asarray(ratios, dtype=np.float64).ravel()
    try:
        pairs = [nx.multiplier_for(float(r)) for r in ratios]
    except ValueError as e:
        raise InputError(f"cannot quantize {what}: {e}") from None
    mult, shift = np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)
    _count(clips, "mult_zero", np.count_nonzero((ratios > 0) & (mult == 0)))
    _count(clips, "mult_coarse", np.count_nonzero((mult > 0) & (mult < 1 << (nx.MULT_BITS - 1))))
    return mult, shift


def quantize_matrix(w_in_out, bias, in_scale: float, out_scales, hw: HwLayout, what: str = "a matrix",
                    clips: dict | None = None, compensation=None):
    """Quantize x @ W (+ b) into a row stream. W is [in, out] float; out_scales: [out] real output scales.

    compensation: None for nearest rounding, else U [in, in] from gptq.compensation_factor for
    error-compensating rounding. Returns (packed bytes, dict of integer arrays as the golden model
    uses them). Saturated biases and degenerate multipliers are counted into `clips` (kind ->
    count), when given.
    """
    w = np.asarray(w_in_out, dtype=np.float64).T  # [out, in]
    if hw.weights == "int4":
        w_int, q, row_scale = (quantize_rows_int4(w, hw.group) if compensation is None
                               else gptq_rows_int4(w, hw.group, compensation))
    else:
        (w_int, row_scale), q = (quantize_rows_int8(w) if compensation is None
                                 else gptq_rows_int8(w, compensation)), None
    acc_scale = row_scale * in_scale  # real value of one accumulator unit, per row
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    bias_int = np.floor(b / acc_scale + 0.5)
    _count(clips, "bias", np.count_nonzero(np.abs(bias_int) > nx.MAX_BIAS))
    bias_int = np.clip(bias_int, -nx.MAX_BIAS, nx.MAX_BIAS).astype(np.int64)
    mult, shift = requant_params(acc_scale / np.broadcast_to(out_scales, acc_scale.shape), what, clips)
    blob = pack_matrix(w_int, q, bias_int, mult, shift, hw)
    return blob, {"row_scale": row_scale}


def layernorm_params(gamma, beta, out_scale: float, clips: dict | None = None):
    """gamma_mult int16, beta int32 and the output shift for numerics.layernorm.

    The gamma shift gf is the largest that keeps the largest gamma in int16, clamped to
    0..LN_MAX_OUT_SHIFT - LN_NORM_FRAC. Counted into `clips` (kind -> count), when given: "gamma"
    (saturated to int16: gf would be below 0), "gamma_zero" (nonzero gammas that round to 0 because
    gf is at its maximum) and "beta" (saturated to int32).
    """
    g = np.asarray(gamma, np.float64) / out_scale
    peak = max(float(np.abs(g).max()), 1e-12)
    gf = int(np.clip(math.floor(math.log2(((1 << (_GAMMA_BITS - 1)) - 1) / peak)), 0, _GAMMA_SHIFT_MAX))
    out_shift = nx.LN_NORM_FRAC + gf
    gamma_mult = _saturate_counted(np.floor(g * 2.0 ** gf + 0.5), _GAMMA_BITS, clips, "gamma")
    if gf == _GAMMA_SHIFT_MAX:
        _count(clips, "gamma_zero", np.count_nonzero((g != 0) & (gamma_mult == 0)))
    beta_int = _saturate_counted(np.floor(np.asarray(beta, np.float64) / out_scale * 2.0 ** out_shift + 0.5),
                                 _BETA_BITS, clips, "beta")
    return gamma_mult, beta_int, out_shift


def act_scale(peak: float) -> float:
    return max(peak, ACT_SCALE_FLOOR) / 127.0


def source_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json and the safetensors header: ties an image to the checkpoint it came from."""
    import hashlib
    import struct

    h = hashlib.sha256(Path(model_dir, "config.json").read_bytes())
    with open(Path(model_dir, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n))
    return h.hexdigest()


# ---- error-compensating rounding: the integer inputs of each matrix --------------------------
MATRIX_INPUTS = {"qkv": "ln1", "attn_out": "ctx", "fc": "ln2", "proj": "gelu"}  # matrix -> observed input


class CalibrationRun(FixedModel):
    """The fixed model assembled layer by layer while the image is made, run on the calibration windows.

    It uses FixedModel's own embed and block, so H is built from exactly the int8 activations the
    hardware multiplies, including every earlier layer's quantization (as already rounded).
    """

    def __init__(self, cfg: ModelConfig, hw: HwLayout, eps_table, head_blob: bytes, embed_scale_blob: bytes,
                 wpe_blob: bytes, ids: list[int]):
        self.cfg, self.hw, self.eps_table = cfg, hw, np.asarray(eps_table, dtype=np.int64)
        self.head = Matrix.from_stream(head_blob, cfg.vocab_size, cfg.d_model, hw)
        self.emb_mult, self.emb_shift = unpack_embed_scale(embed_scale_blob, cfg.vocab_size)
        self.wpe = np.frombuffer(wpe_blob, dtype="<i4").reshape(cfg.n_ctx, cfg.d_model).astype(np.int64)
        shape = (cfg.n_layer, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.k_cache, self.v_cache, self.length = np.zeros(shape), np.zeros(shape), 0
        self.layers = [None] * cfg.n_layer
        self.windows = [ids[b:b + cfg.n_ctx] for b in range(0, len(ids), cfg.n_ctx)]
        self.x = [self.embed(w, 0) for w in self.windows]  # [n, d] int32 residual per window

    def hessians(self, layer: int, lh: dict, sections: dict, inputs=tuple(MATRIX_INPUTS.values())) -> dict:
        """H of the matrix inputs `inputs` of `layer` (names as in MATRIX_INPUTS), with the layer as in
        lh and `sections`: {input: H}."""
        self.layers[layer] = load_layer(sections.__getitem__, layer, lh, self.cfg, self.hw)
        h = {}

        def observe(name, _layer, value):
            if name in inputs:
                h[name] = h.get(name, 0) + hessian(value)

        for x in self.x:
            self.block(x, layer, 0, observe)
        return h

    def advance(self, layer: int, lh: dict, sections: dict) -> None:
        """Run every window through `layer` as finally quantized: the next layer's input."""
        self.layers[layer] = load_layer(sections.__getitem__, layer, lh, self.cfg, self.hw)
        self.x = [self.block(x, layer, 0) for x in self.x]
        self.layers[layer] = None  # only one layer's matrices are held at a time

    def head_hessian(self, lnf_blob: bytes, lnf_shift: int) -> np.ndarray:
        lnf = LayerNormQ.from_stream(lnf_blob, self.cfg.d_model, lnf_shift)
        return sum(hessian(lnf(x, self.eps_table)) for x in self.x)


def rounding_for(weights: str, rounding: str | None) -> str:
    """The rounding a format gets when none is asked for (docs/numerics.md, 'Rounding')."""
    return rounding or DEFAULT_ROUNDING[weights]


# ---- the whole model --------------------------------------------------------------------------
def build_image(ckpt: Checkpoint, opts: QuantOptions, calib_ids: list[int], calib_source: str,
                out_path: Path, progress: bool = True) -> dict:
    cfg, p = ckpt.config, ckpt.params
    opts.validate(cfg)
    hw = HwLayout(bus_bits=opts.bus_bits, weights=opts.weights, group=opts.group)
    rounding = rounding_for(opts.weights, opts.rounding)
    model = FloatModel(cfg, p)
    peaks = calibrate(model, calib_ids, progress)
    d, hd = cfg.d_model, cfg.head_dim
    eps_table = nx.layernorm_eps_table(cfg.layer_norm_eps, d)
    sections: dict[str, bytes] = {}
    layers = []
    clips: dict[str, dict[str, int]] = {}  # tensor -> kind -> count; see CLIP_KINDS
    damping_raised: dict[str, float | None] = {}  # tensor -> damping used, where the requested one failed
    c = lambda tensor: clips.setdefault(tensor, {})  # noqa: E731

    def scale(name: str, layer: int, tensor: str) -> float:
        _count(c(tensor), "scale_floor", 0 < peaks[name][layer] < ACT_SCALE_FLOOR)
        return act_scale(peaks[name][layer])

    def compensation(h, tensor: str, damping: float = opts.damping):
        u, used = compensation_factor(h, damping)
        if used != damping:
            damping_raised[tensor] = used
        return u

    resid_scale = 2.0 ** -nx.RESID_FRAC
    # lm_head first, with nearest rounding: the embedding the calibration run starts from reuses its rows
    s_lnf = scale("lnf", cfg.n_layer, "lnf")
    head_args = (p["wte"].T, None, s_lnf, 2.0 ** -nx.LOGIT_FRAC, hw, "lm_head")
    head_blob, head = quantize_matrix(*head_args, c("lm_head"))
    # host-side: token embedding reuses lm_head's integer rows, scaled into the residual format
    emb_mult, emb_shift = requant_params(head["row_scale"] / resid_scale, "the token embedding", c("embed_scale"))
    embed_scale_blob = pack_embed_scale(emb_mult, emb_shift)
    wpe_blob = _saturate_counted(np.floor(p["wpe"].astype(np.float64) / resid_scale + 0.5), nx.RESID_BITS,
                                 c("wpe"), "value").astype("<i4").tobytes()
    run = None
    if rounding == "gptq":
        run = CalibrationRun(cfg, hw, eps_table, head_blob, embed_scale_blob, wpe_blob, calib_ids)
    for i in progress_bar(range(cfg.n_layer), desc=f"quantize layers ({rounding})", unit="layer", enabled=progress):
        s = {name: scale(name, i, f"L{i}.{name}") for name in CALIBRATED}
        pre = f"h{i}."
        g1, b1, sh1 = layernorm_params(p[pre + "ln1_g"], p[pre + "ln1_b"], s["ln1"], c(f"L{i}.ln1"))
        g2, b2, sh2 = layernorm_params(p[pre + "ln2_g"], p[pre + "ln2_b"], s["ln2"], c(f"L{i}.ln2"))
        matrices = {  # name -> (W [in, out], bias, input scale, output scales)
            "qkv": (p[pre + "w_qkv"], p[pre + "b_qkv"], s["ln1"], np.repeat([s["q"], s["k"], s["v"]], d)),
            "attn_out": (p[pre + "w_o"], p[pre + "b_o"], s["ctx"], resid_scale),
            "fc": (p[pre + "w_fc"], p[pre + "b_fc"], s["ln2"], s["fc"]),
            "proj": (p[pre + "w_proj"], p[pre + "b_proj"], s["gelu"], resid_scale)}
        layer_clips = {name: {} for name in matrices}  # counted for the stored matrices only
        sections[f"L{i}.ln1"] = pack_ln_params(g1, b1)
        for name, args in matrices.items():
            sections[f"L{i}.{name}"], _ = quantize_matrix(*args, hw, f"layer {i} {name}", layer_clips[name])
            if name == "attn_out":
                sections[f"L{i}.ln2"] = pack_ln_params(g2, b2)
            if name == "fc":
                sections[f"L{i}.gelu"] = (nx.gelu_table(s["fc"], s["gelu"]).astype(np.int8)).tobytes()
        att = s["q"] * s["k"] * (1.0 / math.sqrt(hd) if cfg.scale_attn else 1.0) * math.log2(math.e) \
            * 2.0 ** nx.SCORE_FRAC
        att_mult, att_shift = (int(v[0]) for v in requant_params([att], f"layer {i} attention scores",
                                                                  c(f"L{i}.scores")))
        ctx_mult, ctx_shift = (int(v[0]) for v in requant_params([2.0 ** -nx.PROB_FRAC * s["v"] / s["ctx"]],
                                                                  f"layer {i} ctx", c(f"L{i}.ctx")))
        layers.append({"scales": s, "ln1_shift": sh1, "ln2_shift": sh2, "score_mult": att_mult,
                       "score_shift": att_shift, "ctx_mult": ctx_mult, "ctx_shift": ctx_shift,
                       "window": cfg.window_size if cfg.local_layers[i] else 0})
        if run is not None:  # the layer's matrices re-rounded in stream order, each from its input as stored
            for name, args in matrices.items():  # (earlier matrices as rounded, this and later ones nearest)
                h = run.hessians(i, layers[i], sections, (MATRIX_INPUTS[name],))[MATRIX_INPUTS[name]]
                layer_clips[name] = {}
                u = compensation(h, f"L{i}.{name}")
                sections[f"L{i}.{name}"], _ = quantize_matrix(*args, hw, f"layer {i} {name}", layer_clips[name],
                                                              compensation=u)
            run.advance(i, layers[i], sections)
        for name, kinds in layer_clips.items():
            clips[f"L{i}.{name}"] = kinds
    gf, bf, shf = layernorm_params(p["lnf_g"], p["lnf_b"], s_lnf, c("lnf"))
    sections["lnf"] = pack_ln_params(gf, bf)
    head_rounding = "nearest" if run is None else opts.head_rounding
    if head_rounding == "gptq":
        clips["lm_head"], clips["embed_scale"] = {}, {}
        u = compensation(run.head_hessian(sections["lnf"], shf), "lm_head", opts.head_damping)
        head_blob, head = quantize_matrix(*head_args, c("lm_head"), compensation=u)
        emb_mult, emb_shift = requant_params(head["row_scale"] / resid_scale, "the token embedding",
                                             c("embed_scale"))
        embed_scale_blob = pack_embed_scale(emb_mult, emb_shift)
    sections["lm_head"] = head_blob
    sections["embed_scale"] = embed_scale_blob
    sections["wpe"] = wpe_blob
    clips = {tensor: kinds for tensor, kinds in clips.items() if kinds}
    if ckpt.tokenizer_path is not None:
        sections["tokenizer"] = ckpt.tokenizer_path.read_bytes()
    from gpt_fpga.contract.numerics import CONTRACT_VERSION

    rounding_record = {"method": rounding, "lm_head": head_rounding}
    if rounding == "gptq":
        rounding_record.update(damping=opts.damping, calib_tokens=len(calib_ids), damping_raised=damping_raised)
        if head_rounding == "gptq":
            rounding_record["lm_head_damping"] = opts.head_damping
    header = {"contract_version": CONTRACT_VERSION, "config": cfg.to_dict(), "hardware": hw.to_dict(),
              "layers": layers, "lnf_shift": shf, "lnf_scale": s_lnf,
              "ln_eps_table": eps_table.tolist(),
              "calibration": {"source": calib_source, "tokens": len(calib_ids), "method": "absmax"},
              "rounding": rounding_record,
              "source_model": str(ckpt.path), "source_fingerprint": source_fingerprint(ckpt.path),
              "clips": clips}
    write_image(out_path, header, sections)
    for line in clip_warnings(clips):
        print(line, file=sys.stderr, flush=True)
    return header


def quantize_checkpoint(model_dir, out_path, weights="int8", group=DEFAULT_GROUP, bus_bits=64, calib=None,
                        calib_tokens=None, progress=True, rounding=None, damping=DEFAULT_DAMPING,
                        head_rounding=DEFAULT_HEAD_ROUNDING, head_damping=None) -> dict:
    """Quantize a checkpoint into an image at out_path; returns the image header.

    BLAS runs on one thread: the calibration text is sampled one token at a time, and on a shared
    2-core machine a second BLAS thread made those single-token products 5 to 8 times slower
    (docs/numerics.md, 'Speed'); one thread also makes every float sum independent of the core count.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _quantize_checkpoint(model_dir, out_path, weights, group, bus_bits, calib, calib_tokens, progress,
                                    rounding, damping, head_rounding, head_damping)


def _quantize_checkpoint(model_dir, out_path, weights, group, bus_bits, calib, calib_tokens, progress, rounding,
                         damping, head_rounding, head_damping) -> dict:
    calib_text = None if calib is None else read_text_file(calib, "--calib")  # before any work
    ckpt = load_checkpoint(model_dir)
    opts = QuantOptions(weights, group, bus_bits, calib_tokens, rounding=rounding, damping=damping,
                        head_rounding=head_rounding,
                        head_damping=DEFAULT_HEAD_DAMPING if head_damping is None else head_damping)
    opts.validate(ckpt.config)
    if ckpt.tokenizer_path is not None:  # an image with a broken tokenizer would be unusable
        from gpt_fpga.quantize.tokenizer import TextCodec

        TextCodec(ckpt.tokenizer_path)
    if calib is not None:
        from gpt_fpga.quantize.tokenizer import TextCodec

        if ckpt.tokenizer_path is None:
            raise InputError(f"{model_dir} has no tokenizer.json: --calib text cannot be tokenized")
        ids = TextCodec(ckpt.tokenizer_path).encode(calib_text)
        known = [i for i in ids if i < ckpt.config.vocab_size]
        want = calib_tokens or DEFAULT_CALIB_TOKENS
        if len(known) < 16:
            raise InputError(f"--calib {calib}: only {len(known)} token(s) in the model's vocabulary; calibration "
                             f"needs at least 16")
        if len(known) < want or len(known) < len(ids):
            print(f"gpt-fpga quantize: --calib {calib} gives {len(known)} tokens"
                  + (f" ({len(ids) - len(known)} outside the model's vocabulary dropped)" if len(known) < len(ids)
                     else "")
                  + (f", fewer than the {want} asked; calibrating on those" if len(known) < want else ""),
                  file=sys.stderr, flush=True)
        ids = known[:want]
        source = str(calib)
    else:
        n = calib_tokens or DEFAULT_SELF_CALIB_TOKENS
        print(f"gpt-fpga quantize: no --calib text given; calibrating on {n} tokens sampled from the model "
              f"itself (seed 0)", file=sys.stderr, flush=True)
        ids = self_generated_ids(FloatModel(ckpt.config, ckpt.params), n, progress=progress)
        source = "self-generated"
    return build_image(ckpt, opts, ids, source, Path(out_path), progress)
