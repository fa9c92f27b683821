"""Float checkpoint -> fixed-point weight image, following the contract in sim/contract/numerics.py.

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
from tqdm import tqdm

from gpt_fpga.sim.contract.config import ModelConfig

from gpt_fpga.quantize.checkpoint import Checkpoint, load_checkpoint
from gpt_fpga.sim.contract.errors import InputError
from gpt_fpga.sim.contract.image import write_image
from gpt_fpga.sim.contract.layout import GROUP_CHOICES, HwLayout, ceil_div, pack_embed_scale, pack_ln_params, pack_matrix
from gpt_fpga.sim.contract import numerics as nx
from gpt_fpga.sim.float_model import FloatModel

# Activations whose int8 scale is calibrated, per layer (the names FloatModel.forward observes).
CALIBRATED = ("ln1", "q", "k", "v", "ctx", "ln2", "fc", "gelu")
DEFAULT_CALIB_TOKENS = 2048
DEFAULT_SELF_CALIB_TOKENS = 512


@dataclass(frozen=True)
class QuantOptions:
    weights: str = "int8"
    group: int = 32
    bus_bits: int = 64
    calib_tokens: int | None = None

    def validate(self, cfg: ModelConfig):
        if self.weights not in ("int8", "int4"):
            raise InputError(f"--weights must be int8 or int4, got {self.weights}")
        if self.group not in GROUP_CHOICES:
            raise InputError(f"--group must be one of {GROUP_CHOICES}, got {self.group}")
        if self.bus_bits not in (64, 128):
            raise InputError(f"--bus-bits must be 64 or 128, got {self.bus_bits}")
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
    with tqdm(total=n_tokens, desc="calibration text (self-generated)", unit="tok", disable=not progress) as bar:
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
    for begin in tqdm(chunks, desc="calibration", unit="win", disable=not progress):
        model.reset()
        model.forward(ids[begin:begin + cfg.n_ctx], observe=observe)
    return peaks


# ---- weights ----------------------------------------------------------------------------------
def quantize_rows_int8(w):  # [o, i] float -> (int8 [o, i], scale [o])
    scale = np.maximum(np.abs(w).max(axis=1), 1e-12) / 127.0
    return np.clip(np.floor(w / scale[:, None] + 0.5), -127, 127).astype(np.int64), scale


def quantize_rows_int4(w, group: int):
    """int4 in -7..7 with uint8 group scales q[o, g] relative to a per-row base scale.

    Real weight = w4 * q[o, g] * base[o]. q is chosen first (rounded up so nothing clips), then the
    weights are rounded with the quantized scale, so quantizing the scale costs nothing extra.
    """
    o, i = w.shape
    n_groups = ceil_div(i, group)
    padded = np.zeros((o, n_groups * group), np.float64)
    padded[:, :i] = w
    gmax = np.abs(padded.reshape(o, n_groups, group)).max(axis=2)  # [o, g]
    base = np.maximum(gmax.max(axis=1), 1e-12) / (7.0 * nx.GROUP_SCALE_MAX)  # [o]
    q = np.clip(np.ceil(gmax / (7.0 * base[:, None]) - 1e-9), 1, nx.GROUP_SCALE_MAX).astype(np.int64)
    step = (q * base[:, None])[:, np.arange(i) // group]
    w4 = np.clip(np.floor(w / step + 0.5), -7, 7).astype(np.int64)
    return w4, q, base


def requant_params(ratios, what: str = "a matrix") -> tuple[np.ndarray, np.ndarray]:
    try:
        pairs = [nx.multiplier_for(float(r)) for r in np.asarray(ratios, dtype=np.float64).ravel()]
    except ValueError as e:
        raise InputError(f"cannot quantize {what}: {e}") from None
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


def quantize_matrix(w_in_out, bias, in_scale: float, out_scales, hw: HwLayout, what: str = "a matrix"):
    """Quantize x @ W (+ b) into a row stream. W is [in, out] float; out_scales: [out] real output scales.

    Returns (packed bytes, dict of integer arrays as the golden model uses them).
    """
    w = np.asarray(w_in_out, dtype=np.float64).T  # [out, in]
    if hw.weights == "int4":
        w_int, q, row_scale = quantize_rows_int4(w, hw.group)
    else:
        (w_int, row_scale), q = quantize_rows_int8(w), None
    acc_scale = row_scale * in_scale  # real value of one accumulator unit, per row
    b = np.zeros(w.shape[0]) if bias is None else np.asarray(bias, np.float64)
    bias_int = np.clip(np.floor(b / acc_scale + 0.5), -nx.MAX_BIAS, nx.MAX_BIAS).astype(np.int64)
    mult, shift = requant_params(acc_scale / np.broadcast_to(out_scales, acc_scale.shape), what)
    blob = pack_matrix(w_int, q, bias_int, mult, shift, hw)
    return blob, {"row_scale": row_scale}


def layernorm_params(gamma, beta, out_scale: float):
    """gamma_mult int16, beta int32 and the output shift for numerics.layernorm."""
    g = np.asarray(gamma, np.float64) / out_scale
    peak = max(float(np.abs(g).max()), 1e-12)
    gf = int(np.clip(math.floor(math.log2((2 ** 15 - 1) / peak)), 0, nx.LN_MAX_OUT_SHIFT - nx.LN_NORM_FRAC))
    out_shift = nx.LN_NORM_FRAC + gf
    gamma_mult = np.clip(np.floor(g * 2.0 ** gf + 0.5), -(2 ** 15), 2 ** 15 - 1).astype(np.int64)
    beta_int = nx.saturate(np.floor(np.asarray(beta, np.float64) / out_scale * 2.0 ** out_shift + 0.5), 32)
    return gamma_mult, beta_int, out_shift


def act_scale(peak: float) -> float:
    return max(peak, 1e-6) / 127.0


def source_fingerprint(model_dir: Path) -> str:
    """sha256 of config.json and the safetensors header: ties an image to the checkpoint it came from."""
    import hashlib
    import struct

    h = hashlib.sha256(Path(model_dir, "config.json").read_bytes())
    with open(Path(model_dir, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        h.update(f.read(n))
    return h.hexdigest()


# ---- the whole model --------------------------------------------------------------------------
def build_image(ckpt: Checkpoint, opts: QuantOptions, calib_ids: list[int], calib_source: str,
                out_path: Path, progress: bool = True) -> dict:
    cfg, p = ckpt.config, ckpt.params
    opts.validate(cfg)
    hw = HwLayout(bus_bits=opts.bus_bits, weights=opts.weights, group=opts.group)
    model = FloatModel(cfg, p)
    peaks = calibrate(model, calib_ids, progress)
    d, hd = cfg.d_model, cfg.head_dim
    sections: dict[str, bytes] = {}
    layers = []
    resid_scale = 2.0 ** -nx.RESID_FRAC
    for i in tqdm(range(cfg.n_layer), desc="quantize layers", unit="layer", disable=not progress):
        s = {name: act_scale(peaks[name][i]) for name in CALIBRATED}
        pre = f"h{i}."
        g1, b1, sh1 = layernorm_params(p[pre + "ln1_g"], p[pre + "ln1_b"], s["ln1"])
        sections[f"L{i}.ln1"] = pack_ln_params(g1, b1)
        qkv_out = np.repeat([s["q"], s["k"], s["v"]], d)
        sections[f"L{i}.qkv"], _ = quantize_matrix(p[pre + "w_qkv"], p[pre + "b_qkv"], s["ln1"], qkv_out, hw,
                                                   f"layer {i} qkv")
        sections[f"L{i}.attn_out"], _ = quantize_matrix(p[pre + "w_o"], p[pre + "b_o"], s["ctx"], resid_scale, hw,
                                                        f"layer {i} attn_out")
        g2, b2, sh2 = layernorm_params(p[pre + "ln2_g"], p[pre + "ln2_b"], s["ln2"])
        sections[f"L{i}.ln2"] = pack_ln_params(g2, b2)
        sections[f"L{i}.fc"], _ = quantize_matrix(p[pre + "w_fc"], p[pre + "b_fc"], s["ln2"], s["fc"], hw, f"layer {i} fc")
        sections[f"L{i}.gelu"] = (nx.gelu_table(s["fc"], s["gelu"]).astype(np.int8)).tobytes()
        sections[f"L{i}.proj"], _ = quantize_matrix(p[pre + "w_proj"], p[pre + "b_proj"], s["gelu"], resid_scale, hw,
                                                    f"layer {i} proj")
        att = s["q"] * s["k"] * (1.0 / math.sqrt(hd) if cfg.scale_attn else 1.0) * math.log2(math.e) \
            * 2.0 ** nx.SCORE_FRAC
        att_mult, att_shift = (int(v[0]) for v in requant_params([att], f"layer {i} attention scores"))
        ctx_mult, ctx_shift = (int(v[0]) for v in requant_params([2.0 ** -nx.PROB_FRAC * s["v"] / s["ctx"]],
                                                                  f"layer {i} ctx"))
        layers.append({"scales": s, "ln1_shift": sh1, "ln2_shift": sh2, "score_mult": att_mult,
                       "score_shift": att_shift, "ctx_mult": ctx_mult, "ctx_shift": ctx_shift,
                       "window": cfg.window_size if cfg.local_layers[i] else 0})
    s_lnf = act_scale(peaks["lnf"][cfg.n_layer])
    gf, bf, shf = layernorm_params(p["lnf_g"], p["lnf_b"], s_lnf)
    sections["lnf"] = pack_ln_params(gf, bf)
    head_blob, head = quantize_matrix(p["wte"].T, None, s_lnf, 2.0 ** -nx.LOGIT_FRAC, hw, "lm_head")
    sections["lm_head"] = head_blob
    # host-side: token embedding reuses lm_head's integer rows, scaled into the residual format
    emb_mult, emb_shift = requant_params(head["row_scale"] / resid_scale, "the token embedding")
    sections["embed_scale"] = pack_embed_scale(emb_mult, emb_shift)
    sections["wpe"] = nx.saturate(np.floor(p["wpe"].astype(np.float64) / resid_scale + 0.5), 32) \
        .astype("<i4").tobytes()
    if ckpt.tokenizer_path is not None:
        sections["tokenizer"] = ckpt.tokenizer_path.read_bytes()
    from gpt_fpga.sim.contract.numerics import CONTRACT_VERSION

    header = {"contract_version": CONTRACT_VERSION, "config": cfg.to_dict(), "hardware": hw.to_dict(),
              "layers": layers, "lnf_shift": shf, "lnf_scale": s_lnf,
              "ln_eps_table": nx.layernorm_eps_table(cfg.layer_norm_eps, d).tolist(),
              "calibration": {"source": calib_source, "tokens": len(calib_ids), "method": "absmax"},
              "source_model": str(ckpt.path), "source_fingerprint": source_fingerprint(ckpt.path)}
    write_image(out_path, header, sections)
    return header


def quantize_checkpoint(model_dir, out_path, weights="int8", group=32, bus_bits=64, calib=None,
                        calib_tokens=None, progress=True) -> dict:
    ckpt = load_checkpoint(model_dir)
    opts = QuantOptions(weights, group, bus_bits, calib_tokens)
    opts.validate(ckpt.config)
    if ckpt.tokenizer_path is not None:  # an image with a broken tokenizer would be unusable
        from gpt_fpga.quantize.tokenizer import TextCodec

        TextCodec(ckpt.tokenizer_path)
    if calib is not None:
        from gpt_fpga.quantize.tokenizer import TextCodec

        calib = Path(calib)
        if not calib.is_file():
            raise InputError(f"{calib}: no such calibration text file")
        if ckpt.tokenizer_path is None:
            raise InputError(f"{model_dir} has no tokenizer.json: --calib text cannot be tokenized")
        ids = TextCodec(ckpt.tokenizer_path).encode(calib.read_text(encoding="utf-8", errors="replace"))
        ids = [i for i in ids if i < ckpt.config.vocab_size][:calib_tokens or DEFAULT_CALIB_TOKENS]
        if len(ids) < 16:
            raise InputError(f"{calib}: only {len(ids)} token(s) in the model's vocabulary; calibration needs "
                             f"at least 16")
        source = str(calib)
    else:
        n = calib_tokens or DEFAULT_SELF_CALIB_TOKENS
        print(f"gpt-fpga quantize: no --calib text given; calibrating on {n} tokens sampled from the model "
              f"itself (seed 0)", file=sys.stderr, flush=True)
        ids = self_generated_ids(FloatModel(ckpt.config, ckpt.params), n, progress=progress)
        source = "self-generated"
    return build_image(ckpt, opts, ids, source, Path(out_path), progress)
