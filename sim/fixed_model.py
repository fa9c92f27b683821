"""Bit-exact integer model of the accelerator, built only from contract/numerics.py operations.

It reads a weight image (contract/image.py) exactly as the hardware streams it, so a wrong byte in
the image shows up here too. Shapes: n = new tokens, t = cached + new, d = d_model, h = heads,
hd = head_dim, f = d_ff, v = vocab. Integers are held in int64 (or float64 holding exact integers
for the matmuls, see numerics.matvec_acc).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpt_fpga.contract.config import ModelConfig
from gpt_fpga.contract.errors import ImageError
from gpt_fpga.contract.image import Image
from gpt_fpga.contract.layout import HwLayout, layer_matrices, unpack_embed_scale, unpack_ln_params, unpack_matrix
from gpt_fpga.contract import numerics as nx


@dataclass
class Matrix:
    """One matvec as the golden model uses it: effective integer weights and per-row requant."""

    w_eff: np.ndarray  # [o, i] float64 holding exact integers (int8, or int4 * group scale)
    bias: np.ndarray  # [o] int64
    mult: np.ndarray  # [o]
    shift: np.ndarray  # [o]

    @classmethod
    def from_stream(cls, blob, d_out: int, d_in: int, hw: HwLayout) -> "Matrix":
        """The matrix from its stream bytes; a row shift above numerics.MAX_SHIFT is refused with
        ImageError, as the matvec core refuses it (its ``error.shift`` bit)."""
        m = unpack_matrix(blob, d_out, d_in, hw)
        bad = np.flatnonzero(m["shift"] > nx.MAX_SHIFT)
        if bad.size:
            r = int(bad[0])
            raise ImageError(f"matrix stream of {d_out} x {d_in}: row {r} has shift {int(m['shift'][r])}, above "
                             f"the contract's maximum {nx.MAX_SHIFT} ({bad.size} of {d_out} rows exceed it)")
        w = m["w"] if m["group_scale"] is None else nx.expand_int4(m["w"], m["group_scale"], hw.group)
        return cls(np.ascontiguousarray(w, dtype=np.float64), m["bias"], m["mult"], m["shift"])

    def __call__(self, a, out_bits: int):  # [n, i] int8 -> [n, o]
        return nx.matvec(self.w_eff, a, self.bias, self.mult, self.shift, out_bits)


@dataclass
class LayerNormQ:
    gamma_mult: np.ndarray  # [d]
    beta: np.ndarray  # [d]
    out_shift: int

    @classmethod
    def from_stream(cls, blob, d: int, out_shift: int) -> "LayerNormQ":
        return cls(*unpack_ln_params(blob, d), out_shift)

    def __call__(self, x, eps_table):  # [n, d] int32 -> [n, d] int8
        return nx.layernorm(x, self.gamma_mult, self.beta, self.out_shift, eps_table)


def _int_in(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def check_model_header(path, h: dict) -> ModelConfig:
    """Every number the integer model takes from the header is present and in its contract range."""
    def bad(what):
        return ImageError(f"{path}: header field {what} is missing or out of range")

    try:
        cfg = ModelConfig.from_dict(h["config"])
    except (KeyError, TypeError, ValueError):
        raise bad("'config'") from None
    dims = (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size, cfg.n_ctx)
    if not all(_int_in(v, 1, 1 << 24) for v in dims) or cfg.d_model % cfg.n_head \
            or max(cfg.vocab_size, 3 * cfg.d_model, cfg.d_ff) > nx.MAX_ROWS or cfg.n_ctx > nx.MAX_CONTEXT \
            or max(cfg.d_model, cfg.d_ff) > nx.MAX_D_IN \
            or len(cfg.local_layers) != cfg.n_layer or not _int_in(cfg.window_size, 0, 1 << 24):
        raise bad("'config' (dimensions)")
    layers = h.get("layers")
    if not isinstance(layers, list) or len(layers) != cfg.n_layer:
        raise bad("'layers'")
    for i, lh in enumerate(layers):
        if not isinstance(lh, dict):
            raise bad(f"'layers[{i}]'")
        for key, lo, hi in (("score_mult", 0, (1 << nx.MULT_BITS) - 1), ("score_shift", 0, nx.MAX_SHIFT),
                            ("ctx_mult", 0, (1 << nx.MULT_BITS) - 1), ("ctx_shift", 0, nx.MAX_SHIFT),
                            ("ln1_shift", 0, nx.LN_MAX_OUT_SHIFT), ("ln2_shift", 0, nx.LN_MAX_OUT_SHIFT),
                            ("window", 0, 1 << 24)):
            if not _int_in(lh.get(key), lo, hi):
                raise bad(f"'layers[{i}].{key}'")
        if not isinstance(lh.get("scales"), dict):
            raise bad(f"'layers[{i}].scales'")
    if not _int_in(h.get("lnf_shift"), 0, nx.LN_MAX_OUT_SHIFT):
        raise bad("'lnf_shift'")
    eps = h.get("ln_eps_table")
    if not (isinstance(eps, list) and len(eps) == nx.LN_MAX_SHIFT + 1 and all(_int_in(e, 1, (1 << nx.LN_EPS_BITS) - 1) for e in eps)):
        raise bad(f"'ln_eps_table' ({nx.LN_MAX_SHIFT + 1} entries expected)")
    return cfg


def gelu_table_from_stream(blob) -> np.ndarray:
    if len(blob) != 256:
        raise ValueError(f"a GELU table has 256 entries, the section has {len(blob)} bytes")
    return np.frombuffer(blob, dtype=np.int8).astype(np.int64)


def load_layer(section, i: int, lh: dict, cfg: ModelConfig, hw: HwLayout) -> dict:
    """Layer i as FixedModel.block uses it: its header entry lh plus its sections (section(name) -> bytes)."""
    mats = {name: Matrix.from_stream(section(f"L{i}.{name}"), o, n_in, hw) for name, o, n_in in layer_matrices(cfg)}
    return dict(lh, **mats, ln1=LayerNormQ.from_stream(section(f"L{i}.ln1"), cfg.d_model, lh["ln1_shift"]),
                ln2=LayerNormQ.from_stream(section(f"L{i}.ln2"), cfg.d_model, lh["ln2_shift"]),
                gelu=gelu_table_from_stream(section(f"L{i}.gelu")))


class FixedModel:
    """Stateful like FloatModel: ``forward(ids)`` returns dequantized float32 logits [n, v]."""

    def __init__(self, image: Image):
        self.image = image
        h = image.header
        self.cfg = check_model_header(image.path, h)
        try:
            hw = image.hw
            cfg = self.cfg
            self.eps_table = np.asarray(h["ln_eps_table"], dtype=np.int64)
            self.layers = [load_layer(image.section, i, lh, cfg, hw) for i, lh in enumerate(h["layers"])]
            self.lnf = LayerNormQ.from_stream(image.section("lnf"), cfg.d_model, h["lnf_shift"])
            self.head = Matrix.from_stream(image.section("lm_head"), cfg.vocab_size, cfg.d_model, hw)
            self.emb_mult, self.emb_shift = unpack_embed_scale(image.section("embed_scale"), cfg.vocab_size)
            self.wpe = np.frombuffer(image.section("wpe"), dtype="<i4").reshape(cfg.n_ctx, cfg.d_model) \
                .astype(np.int64)
        except ImageError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ImageError(f"{image.path}: image content does not match its header ({type(e).__name__}: {e})") \
                from None
        shape = (cfg.n_layer, cfg.n_head, cfg.n_ctx, cfg.head_dim)
        self.k_cache = np.zeros(shape, np.float64)  # int8 values; float64 for exact BLAS dots
        self.v_cache = np.zeros(shape, np.float64)
        self.length = 0

    def reset(self):
        self.length = 0

    @property
    def position(self):
        return self.length

    def embed(self, ids, pos: int):  # [n] -> [n, d] int32 residual
        """Host step: the token's lm_head row, scaled into the residual format, plus the position row."""
        ids = np.asarray(ids, dtype=np.int64)
        tok = nx.requantize(self.head.w_eff[ids].astype(np.int64), self.emb_mult[ids, None],
                            self.emb_shift[ids, None], nx.RESID_BITS)
        return nx.residual_add(tok, self.wpe[pos:pos + len(ids)])

    def block(self, x, layer: int, pos: int, observe=None):  # [n, d] int32 -> [n, d] int32
        cfg, L = self.cfg, self.layers[layer]
        obs = observe or (lambda name, layer, value: None)
        n, d, h, hd = x.shape[0], cfg.d_model, cfg.n_head, cfg.head_dim
        a = L["ln1"](x, self.eps_table)
        obs("ln1", layer, a)
        qkv = L["qkv"](a, nx.ACT_BITS)  # [n, 3d] int8
        q, k, v = (qkv[:, i * d:(i + 1) * d].reshape(n, h, hd).transpose(1, 0, 2) for i in range(3))  # [h, n, hd]
        obs("q", layer, q), obs("k", layer, k), obs("v", layer, v)
        self.k_cache[layer, :, pos:pos + n] = k
        self.v_cache[layer, :, pos:pos + n] = v
        t = pos + n
        scores = nx.attention_scores(q, self.k_cache[layer, :, :t])  # [h, n, t]
        mask = nx.visible_keys(np.arange(pos, t), t, L["window"])
        p = nx.softmax(scores, mask[None], L["score_mult"], L["score_shift"])  # [h, n, t] uint16
        ctx = nx.attention_context(p, self.v_cache[layer, :, :t])  # [h, n, hd]
        ctx = nx.requantize(ctx.transpose(1, 0, 2).reshape(n, d), L["ctx_mult"], L["ctx_shift"], nx.ACT_BITS)
        obs("ctx", layer, ctx)
        x = nx.residual_add(x, L["attn_out"](ctx, nx.RESID_BITS))
        obs("resid_attn", layer, x)
        a = L["ln2"](x, self.eps_table)
        obs("ln2", layer, a)
        f = L["fc"](a, nx.ACT_BITS)
        obs("fc", layer, f)
        g = nx.gelu(f, L["gelu"])
        obs("gelu", layer, g)
        x = nx.residual_add(x, L["proj"](g, nx.RESID_BITS))
        obs("resid_mlp", layer, x)
        return x

    def forward_int(self, ids, observe=None):  # [n] -> int32 logits [n, v] (value = int / 2**16)
        ids = np.asarray(ids, dtype=np.int64)
        pos, n = self.length, len(ids)
        if pos + n > self.cfg.n_ctx:
            raise ValueError(f"position {pos + n} exceeds the context of {self.cfg.n_ctx}")
        x = self.embed(ids, pos)
        for layer in range(self.cfg.n_layer):
            x = self.block(x, layer, pos, observe)
        self.length = pos + n
        a = self.lnf(x, self.eps_table)
        if observe:
            observe("lnf", self.cfg.n_layer, a)
        return self.head(a, nx.RESID_BITS)

    def forward(self, ids, observe=None) -> np.ndarray:
        return (self.forward_int(ids, observe) * 2.0 ** -nx.LOGIT_FRAC).astype(np.float32)
