"""The integer arithmetic contract: the single definition of every number the accelerator computes.

docs/numerics.md explains the why; this module is the what. The fixed-point golden model
(sim/fixed_model.py), the quantizer (quantize/) and the cocotb testbenches (sim/tb/*.py) all call
these functions, and the Amaranth cores (hw/) implement them bit for bit.

Conventions
-----------
* All arithmetic is on NumPy int64 arrays holding exact integers; no float is used on the
  datapath. Floats appear only in the quantizer, which turns real scales into integer
  multipliers and shifts with :func:`multiplier_for`.
* ``round_shift(x, s)`` is the only rounding rule: ``floor((x + 2**(s-1)) / 2**s)``, i.e. round
  half up (ties toward +inf), one adder and an arithmetic shift in hardware.
* ``saturate(x, bits)`` clamps to the two's-complement range of ``bits``.
* Functions accept a leading batch dimension (``[..., n]``) so the golden model can run many rows at
  once; the hardware processes one row at a time with identical results, because rows are
  independent.
"""

from __future__ import annotations

import math

import numpy as np

CONTRACT_VERSION = 1

# ---- formats ----------------------------------------------------------------------------------
ACT_BITS = 8  # activations entering a matvec, and the K/V cache: int8
ACC_BITS = 32  # matvec accumulator
RESID_BITS = 32  # residual stream: int32 ...
RESID_FRAC = 16  # ... with value = int / 2**16 (range +-32768, step 1.5e-5)
LOGIT_FRAC = 16  # lm_head output: int32 logits, value = int / 2**16
MULT_BITS = 15  # requantization multipliers are normalised into [2**14, 2**15)
MAX_SHIFT = 47  # requantization shift range [0, 47]
MAX_D_IN = 4096  # matvec input length bound used by the overflow argument
MAX_BIAS = 1 << 30  # |bias| bound, so |bias + sum| < 2**31
INT4_MIN, INT4_MAX = -8, 7
MAX_ROWS = (1 << 16) - 1  # matvec output rows per call (n_rows is 16 bits): vocab, 3d and d_ff must fit
MAX_CONTEXT = 2048  # softmax row length (Softmax max_len): positions attended per query
MAX_HEAD_DIM = 256  # bound behind |scores| <= 2**22
LN_EPS_BITS = 48  # width of the LayerNorm eps table entries (and the core's eps port)
LN_MAX_OUT_SHIFT = 46  # LayerNorm output shift range 0..46 (10 + a gamma shift of at most 36)
GROUP_SCALE_MAX = 255  # int4 group scales are uint8, 1..255

# LayerNorm
LN_IN_BITS = 16  # residual values are shifted right until they fit int16
LN_NORM_FRAC = 10  # normalised value (x - mean) / std as a signed fixed-point with 10 fraction bits
RSQRT_INDEX_BITS = 10  # table index: top 10 bits of a 16-bit mantissa in [2**14, 2**16)
RSQRT_FRAC = 23  # table value ~ 2**23 / sqrt(mantissa), in [2**15, 2**16)
LN_MAX_SHIFT = RESID_BITS - LN_IN_BITS + 1  # input shifts 0..17 (17 only for x = -2**31)

# Softmax (scores are requantized to log2 units with SCORE_FRAC fraction bits)
SCORE_FRAC = 8
EXP_FRAC = 15  # exp table values are 2**15 * 2**(-f/256), in (2**14, 2**15]
PROB_FRAC = 15  # probabilities: uint16 with 15 fraction bits (1.0 == 32768)
RECIP_INDEX_BITS = 10
RECIP_FRAC = 31  # reciprocal table ~ 2**31 / mantissa, in [2**15, 2**16)


# ---- primitives -------------------------------------------------------------------------------
def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def round_shift(x, shift):
    """Arithmetic right shift with round half up: floor((x + 2**(shift-1)) / 2**shift); shift >= 0."""
    x, shift = _i64(x), _i64(shift)
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
    return np.right_shift(x + half, shift)


def saturate(x, bits: int):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return np.clip(_i64(x), lo, hi)


def requantize(acc, mult, shift, out_bits: int):
    """saturate(round_shift(acc * mult, shift), out_bits).

    acc is int32, mult < 2**15 (unsigned), shift in [0, 47], so the product fits 47 bits.
    """
    return saturate(round_shift(_i64(acc) * _i64(mult), shift), out_bits)


def bit_length(x):
    """Number of bits needed for the non-negative integers x (0 -> 0)."""
    x = _i64(x)
    out = np.zeros_like(x)
    v = x.copy()
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= (1 << step)
        out += np.where(big, step, 0)
        v = np.where(big, v >> step, v)
    return out + (v > 0)


# ---- matvec -----------------------------------------------------------------------------------
def expand_int4(w4, group_scale, group: int):
    """Effective integer weights q[o, i // group] * w4[o, i]: the int4 accumulation written as one dot.

    sum_g q_g * (sum_{i in g} w_i a_i) == sum_i (q_{g(i)} w_i) a_i exactly, so the hardware may
    accumulate each group and scale it, and the model may pre-expand.
    """
    w4, q = _i64(w4), _i64(group_scale)
    return w4 * np.repeat(q, group, axis=-1)[..., : w4.shape[-1]]


def matvec_acc(w_eff, a, bias):
    """acc[..., o] = bias[o] + sum_i w_eff[o, i] * a[..., i]   (int32, never overflows).

    Overflow argument: |w| <= 128 (int8) or 8 * 255 (int4 * group scale), |a| <= 128,
    d_in <= 4096: |sum| <= 2**30; |bias| <= 2**30; so |acc| < 2**31.
    Computed through float64 matmul, which is exact for integers below 2**53.
    """
    w_eff, a = np.asarray(w_eff), np.asarray(a)
    prod = np.asarray(a, dtype=np.float64) @ np.asarray(w_eff, dtype=np.float64).T
    return prod.astype(np.int64) + _i64(bias)


def matvec(w_eff, a, bias, mult, shift, out_bits: int):
    """A whole matvec: accumulate, then requantize each output channel with its (mult, shift)."""
    return requantize(matvec_acc(w_eff, a, bias), mult, shift, out_bits)


def residual_add(x, y):
    """x + y on the int32 residual stream, saturating."""
    return saturate(_i64(x) + _i64(y), RESID_BITS)


# ---- GELU -------------------------------------------------------------------------------------
def gelu_table(in_scale: float, out_scale: float) -> np.ndarray:
    """int8 -> int8 table: round-half-up(gelu_new(i * in_scale) / out_scale), saturated; index i + 128."""
    i = np.arange(-128, 128, dtype=np.float64)
    x = i * in_scale
    y = 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))
    return saturate(np.floor(y / out_scale + 0.5), ACT_BITS)


def gelu(x, table):
    """Table lookup: table[x + 128] for int8 x."""
    return _i64(table)[_i64(x) + 128]


# ---- LayerNorm --------------------------------------------------------------------------------
def rsqrt_table() -> np.ndarray:
    """768 entries: round(2**23 / sqrt(m_mid)) for the mantissa interval starting at (idx + 256) * 64."""
    idx = np.arange(3 << (RSQRT_INDEX_BITS - 2))  # 768: mantissas [2**14, 2**16) in steps of 2**6
    m_mid = (idx + 256) * 64 + 32
    return np.floor(2.0 ** RSQRT_FRAC / np.sqrt(m_mid) + 0.5).astype(np.int64)


RSQRT_TABLE = rsqrt_table()


def rsqrt(u):
    """Integer reciprocal square root of u >= 1: returns (y, t) with 1/sqrt(u) ~= y * 2**-(23 + t).

    u is normalised by an even shift 2t (t may be negative) into m in [2**14, 2**16); the top 10
    bits of m index RSQRT_TABLE. Relative error <= 2**-9.
    """
    u = _i64(u)
    t = (bit_length(u) - 15) // 2
    m = np.where(t >= 0, u >> np.maximum(2 * t, 0), u << np.maximum(-2 * t, 0))
    return RSQRT_TABLE[(m >> 6) - 256], t


def layernorm_eps_table(eps: float, d: int) -> np.ndarray:
    """E[sh] = max(1, round(eps * d**2 * 2**(2 * (RESID_FRAC - sh)))) for input shifts sh = 0..17.

    eps expressed in the units of V = d * sum(xs**2) - sum(xs)**2, where xs = x >> sh.
    """
    sh = np.arange(LN_MAX_SHIFT + 1)
    e = np.floor(eps * float(d) ** 2 * np.power(2.0, 2 * (RESID_FRAC - sh)) + 0.5)
    return np.maximum(e, 1).astype(np.int64)


def layernorm_input_shift(x):
    """Per row: sh = max(0, bit_length(max |x|) - 15), so every x >> sh fits int16.

    (Not always the smallest such shift: a peak of exactly -2**15 gets 1. The rule is chosen because it
    needs only |x| and a leading-zero count; sh is 17 only for x = -2**31.)
    """
    peak = np.max(np.abs(_i64(x)), axis=-1)
    return np.maximum(bit_length(peak) - (LN_IN_BITS - 1), 0)


def layernorm(x, gamma_mult, beta, out_shift: int, eps_table):
    """int32 residual [..., d] -> int8 [..., d].

    1. sh = layernorm_input_shift(x); xs = x >> sh                       (int16)
    2. S = sum(xs); Q = sum(xs**2)                                        (28 and 42 bits)
    3. c = d * xs - S; V = d * Q - S**2                                   (29 and 55 bits)
    4. (y, t) = rsqrt(V + E[sh])
    5. n = round_shift(c * y, 23 + t - 10)  ~ (x - mean) / std * 2**10   (|n| < 2**17)
    6. out = saturate(round_shift(n * gamma_mult + beta, out_shift), 8)
    where gamma_mult = round(gamma / s_out * 2**(out_shift - 10)) (int16) and
    beta = round(beta / s_out * 2**out_shift) (int32), s_out the output's int8 scale.
    """
    x = _i64(x)
    d = x.shape[-1]
    sh = layernorm_input_shift(x)
    xs = x >> sh[..., None]
    s = xs.sum(axis=-1)
    q = (xs * xs).sum(axis=-1)
    c = d * xs - s[..., None]
    v = d * q - s * s
    y, t = rsqrt(v + _i64(eps_table)[sh])
    n = round_shift(c * y[..., None], (RSQRT_FRAC - LN_NORM_FRAC + t)[..., None])
    return saturate(round_shift(n * _i64(gamma_mult) + _i64(beta), out_shift), ACT_BITS)


# ---- softmax and attention --------------------------------------------------------------------
def exp2_table() -> np.ndarray:
    """256 entries: round(2**15 * 2**(-f / 256)), f = 0..255; values in (2**14, 2**15]."""
    f = np.arange(1 << SCORE_FRAC)
    return np.floor(2.0 ** EXP_FRAC * np.power(2.0, -f / (1 << SCORE_FRAC)) + 0.5).astype(np.int64)


def recip_table() -> np.ndarray:
    """1024 entries: round(2**31 / m_mid) for the mantissa interval starting at (idx + 1024) * 32."""
    idx = np.arange(1 << RECIP_INDEX_BITS)
    m_mid = (idx + 1024) * 32 + 16
    return np.floor(2.0 ** RECIP_FRAC / m_mid + 0.5).astype(np.int64)


EXP2_TABLE = exp2_table()
RECIP_TABLE = recip_table()


def attention_scores(q, k):
    """scores[..., n, t] = sum_e q[..., n, e] * k[..., t, e]: int8 . int8 over the head dim (|s| <= 2**22)."""
    prod = np.asarray(q, dtype=np.float64) @ np.swapaxes(np.asarray(k, dtype=np.float64), -1, -2)
    return prod.astype(np.int64)


def softmax(scores, mask, mult: int, shift: int):
    """int32 scores [..., t] with a visibility mask -> uint16 probabilities with 15 fraction bits.

    1. z = requantize(scores, mult, shift, 32)     log2 units, 8 fraction bits; mult/2**shift folds
                                                     s_q * s_k * log2(e) * 2**8 (and GPT-2's 1/sqrt(hd))
    2. zmax = max of z over visible positions
    3. diff = zmax - z; e = EXP2_TABLE[diff & 255] >> min(diff >> 8, 16); masked -> e = 0
    4. S = sum(e) (>= 2**15 because the maximum contributes 2**15); k = bit_length(S)
    5. r = RECIP_TABLE[(S >> (k - 16) >> 5) - 1024]   ~ 2**(15 + k) / S
    6. p = round_shift(e * r, k)                      (p <= 2**15 + 16)
    A row with no visible position gives all zeros.
    """
    mask = np.asarray(mask, dtype=bool)
    z = requantize(scores, mult, shift, ACC_BITS)
    lowest = -(1 << 40)
    zmax = np.max(np.where(mask, z, lowest), axis=-1, keepdims=True)
    diff = np.where(mask, zmax - z, 0)
    e = np.where(mask, EXP2_TABLE[diff & 0xFF] >> np.minimum(diff >> SCORE_FRAC, 16), 0)
    total = e.sum(axis=-1, keepdims=True)
    safe = np.maximum(total, 1 << EXP_FRAC)
    k = bit_length(safe)
    r = RECIP_TABLE[((safe >> (k - 16)) >> 5) - 1024]
    return round_shift(e * r, k)


def attention_context(p, v):
    """ctx_acc[..., e] = sum_t p[t] * v[t, e]: uint16 probability . int8 value (|acc| < 2**24)."""
    p = np.asarray(p, dtype=np.float64)
    return (p @ np.asarray(v, dtype=np.float64)).astype(np.int64)


def visible_keys(query_pos, n_keys: int, window: int):
    """[n] query positions -> [n, n_keys] bool: key j visible iff j <= i and (window == 0 or i - j < window)."""
    i = _i64(query_pos)[:, None]
    j = np.arange(n_keys)[None, :]
    vis = j <= i
    if window:
        vis &= (i - j) < window
    return vis


# ---- quantizer side: real scale -> integer multiplier and shift ------------------------------
def multiplier_for(ratio: float) -> tuple[int, int]:
    """(mult, shift) with mult / 2**shift ~= ratio, mult in [2**14, 2**15), shift in [0, 47].

    Ratios too large for shift 0 raise; tiny ratios keep shift 47 and a smaller multiplier.
    """
    if not ratio > 0 or not math.isfinite(ratio):
        if ratio == 0:
            return 0, 0
        raise ValueError(f"requantization ratio must be positive and finite, got {ratio}")
    shift = (MULT_BITS - 1) - math.floor(math.log2(ratio))
    mult = math.floor(ratio * 2.0 ** shift + 0.5)
    if mult >= 1 << MULT_BITS:
        mult, shift = mult >> 1, shift - 1
    if shift < 0:
        raise ValueError(f"requantization ratio {ratio} is >= 2**15: the output scale is too fine")
    if shift > MAX_SHIFT:
        mult, shift = math.floor(ratio * 2.0 ** MAX_SHIFT + 0.5), MAX_SHIFT
    return int(mult), int(shift)
