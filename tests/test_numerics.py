"""The integer arithmetic contract (contract/numerics.py), pinned against hand-derived cases.

Every expected value below was worked out by hand from the rule written in the docstrings, with the
derivation in a comment next to it; none comes from running the code under test. No case is marked
``xfail`` or skipped: the code agrees with its docstrings on every case here, and each must pass.
"""

from __future__ import annotations


import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpt_fpga.contract import numerics as nx

I32_MIN, I32_MAX = -(1 << 31), (1 << 31) - 1


def ints(a):
    return [int(v) for v in np.asarray(a).ravel()]


# ---- round_shift: floor((x + 2**(s-1)) / 2**s), ties toward +inf --------------------------------
@pytest.mark.parametrize("x, s, want", [
    (5, 1, 3),        # (5 + 1) / 2 = 3            (2.5 -> 3)
    (-5, 1, -2),      # (-5 + 1) / 2 = -2          (-2.5 -> -2: half *up*, not away from zero)
    (-6, 2, -1),      # (-6 + 2) / 4 = -1          (-1.5 -> -1)
    (6, 2, 2),        # (6 + 2) / 4 = 2            (1.5 -> 2)
    (-2, 2, 0),       # (-2 + 2) / 4 = 0           (-0.5 -> 0)
    (-7, 2, -2),      # floor((-7 + 2) / 4) = floor(-1.25) = -2
    (7, 2, 2),        # floor(9 / 4) = 2           (1.75 -> 2)
    (-3, 2, -1),      # floor(-1 / 4) = -1         (-0.75 -> -1)
    (1, 1, 1),        # floor(2 / 2) = 1           (0.5 -> 1)
    (-1, 1, 0),       # floor(0 / 2) = 0           (-0.5 -> 0)
    (0, 5, 0),
    (3 << 39, 40, 2),  # 1.5 * 2**40 + 2**39 = 2 * 2**40 -> 2
    (-(3 << 39), 40, -1),  # (-1.5 * 2**40 + 0.5 * 2**40) / 2**40 = -1
    (123, 0, 123), (-123, 0, -123), (I32_MIN, 0, I32_MIN),  # shift 0 is the identity (no half added)
])
def test_round_shift(x, s, want):
    assert int(nx.round_shift(x, s)) == want


def test_round_shift_elementwise_shifts():
    # per-element shift: [5>>1 tie -> 3, 5>>0 -> 5, -5>>2: floor(-3/4) = -1]
    assert ints(nx.round_shift([5, 5, -5], [1, 0, 2])) == [3, 5, -1]


# ---- saturate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("x, bits, want", [
    (200, 8, 127), (-200, 8, -128), (127, 8, 127), (-128, 8, -128), (128, 8, 127), (-129, 8, -128),
    (40000, 16, 32767), (-40000, 16, -32768),
    (1 << 31, 32, I32_MAX), (-(1 << 31) - 1, 32, I32_MIN), (I32_MAX, 32, I32_MAX), (I32_MIN, 32, I32_MIN),
    (1 << 45, 32, I32_MAX), (-(1 << 45), 32, I32_MIN), (0, 8, 0), (-5, 8, -5),
])
def test_saturate(x, bits, want):
    assert int(nx.saturate(x, bits)) == want


# ---- requantize: saturate(round_shift(acc * mult, shift), out_bits) ------------------------------
@pytest.mark.parametrize("acc, mult, shift, bits, want", [
    # four int8 products (-128)*(-128) = 16384 each: acc = 65536; mult/2**shift = 16384/2**14 = 1
    (4 * (-128) * (-128), 16384, 14, 8, 127),        # 65536 saturates to int8 max
    (4 * (-128) * (-128), 16384, 14, 32, 65536),     # ... and passes through a 32-bit output
    (-4 * (-128) * (-128), 16384, 14, 8, -128),      # -65536 saturates to int8 min
    # one product (-128)*(-128) = 2**14: 2**14 * 2**14 / 2**21 = 128 -> int8 127; / 2**22 = 64
    ((-128) * (-128), 16384, 21, 8, 127),
    ((-128) * (-128), 16384, 22, 8, 64),
    (100, 24576, 15, 8, 75),          # 100 * 0.75 = 75 exactly
    (3, 16384, 15, 8, 2),             # 3 * 0.5 = 1.5 -> 2 (tie up)
    (-3, 16384, 15, 8, -1),           # -1.5 -> -1 (tie up)
    (-5, 16384, 15, 8, -2),           # -2.5 -> -2
    (5, 3, 0, 8, 15),                 # shift 0: plain product
    (50, 3, 0, 8, 127),               # 150 saturates
    (-50, 3, 0, 8, -128),             # -150 saturates
    (I32_MAX, 32767, 0, 32, I32_MAX),  # product ~2**46 saturates at the int32 ends
    (I32_MIN, 32767, 0, 32, I32_MIN),
    # -2**31 * (2**15 - 1) = -2**46 + 2**31; + half 2**46 = 2**31; floor(2**31 / 2**47) = 0 (-0.49998 -> 0)
    (I32_MIN, 32767, 47, 32, 0),
    # -2**31 * 2**14 / 2**46 = -0.5 exactly: tie goes up -> 0; -2**31 * 2**14 / 2**45 = -1
    (I32_MIN, 16384, 46, 8, 0),
    (I32_MIN, 16384, 45, 8, -1),
])
def test_requantize(acc, mult, shift, bits, want):
    assert int(nx.requantize(acc, mult, shift, bits)) == want


def test_requantize_per_channel():
    # per-channel (mult, shift) broadcast along the last axis:
    # [10 * 16384 / 2**14 = 10, 10 * 24576 / 2**15 = 7.5 -> 8, 10 * 16384 / 2**16 = 2.5 -> 3]
    got = nx.requantize([[10, 10, 10]], [16384, 24576, 16384], [14, 15, 16], 8)
    assert ints(got) == [10, 8, 3]


# ---- bit_length --------------------------------------------------------------------------------
@pytest.mark.parametrize("x, want", [
    (0, 0), (1, 1), (2, 2), (3, 2), (4, 3), (255, 8), (256, 9), (32767, 15), (32768, 16),
    ((1 << 31) - 1, 31), (1 << 31, 32), (1 << 40, 41), ((1 << 62) - 1, 62), (1 << 62, 63),
])
def test_bit_length(x, want):
    assert int(nx.bit_length(x)) == want


def test_bit_length_array():
    assert ints(nx.bit_length([0, 1, 7, 8, 1 << 33])) == [0, 1, 3, 4, 34]


# ---- int4 expansion and the matvec ------------------------------------------------------------
def test_expand_int4():
    # group 2: inputs 0,1 use scale column 0, input 2 uses column 1 (d_in = 3 is not a multiple)
    w4 = [[-8, 7, 1], [3, -8, -1]]
    q = [[255, 1], [2, 3]]
    # row 0: -8*255 = -2040, 7*255 = 1785, 1*1 = 1; row 1: 3*2 = 6, -8*2 = -16, -1*3 = -3
    assert nx.expand_int4(w4, q, 2).tolist() == [[-2040, 1785, 1], [6, -16, -3]]


def test_expand_int4_extremes_group32():
    # d_in 40, group 32: inputs 0..31 -> scale 255, inputs 32..39 -> scale 1
    w4 = np.full((1, 40), -8)
    got = nx.expand_int4(w4, [[255, 1]], 32)
    assert ints(got[0, :32]) == [-2040] * 32 and ints(got[0, 32:]) == [-8] * 8


def test_matvec_acc_and_matvec():
    w = [[1, 2, 3], [-1, 0, 4]]
    a = [[-128, 127, 5], [1, 1, 1]]
    bias = [10, -20]
    # row a0: o0 = 10 + (-128 + 254 + 15) = 151;  o1 = -20 + (128 + 0 + 20) = 128
    # row a1: o0 = 10 + 6 = 16;                   o1 = -20 + 3 = -17
    assert nx.matvec_acc(w, a, bias).tolist() == [[151, 128], [16, -17]]
    # requantize with ratio 0.5 (16384 / 2**15): 75.5 -> 76, 64, 8, -8.5 -> -8
    assert nx.matvec(w, a, bias, [16384, 16384], [15, 15], 8).tolist() == [[76, 64], [8, -8]]
    # ratio 1, int8 output: 151 saturates, 128 saturates
    assert nx.matvec(w, a, bias, 16384, 14, 8).tolist() == [[127, 127], [16, -17]]


def test_matvec_acc_worst_case_is_exact():
    # |w| = 2040 (int4 -8 * 255), a = -128, d_in = 4096: sum = 2040 * 128 * 4096 = 1069547520 exactly,
    # plus bias 2**30 = 1073741824: 2143289344 < 2**31, every digit must survive the float64 path
    w = np.full((1, 4096), -2040)
    a = np.full((1, 4096), -128)
    assert int(nx.matvec_acc(w, a, [1 << 30])[0, 0]) == 2040 * 128 * 4096 + (1 << 30) == 2143289344
    # an odd sum that needs the last bit: 4095 * 1 + 1 * 3 + bias 1 = 4099
    a2 = np.ones((1, 4096), np.int64)
    a2[0, -1] = 3
    assert int(nx.matvec_acc(np.ones((1, 4096)), a2, [1])[0, 0]) == 4099


def test_residual_add_saturates():
    # 2**31 - 1 + 1 saturates at the top; -2**31 - 1 at the bottom; 5 - 7 = -2
    assert ints(nx.residual_add([I32_MAX, I32_MIN, 5], [1, -1, -7])) == [I32_MAX, I32_MIN, -2]


# ---- multiplier_for: mult / 2**shift ~ ratio, mult in [2**14, 2**15), shift in [0, 47] ----------
@pytest.mark.parametrize("ratio, want", [
    (1.0, (16384, 14)),          # floor(log2 1) = 0 -> shift 14, mult = 2**14
    (0.75, (24576, 15)),         # floor(log2 .75) = -1 -> shift 15, mult = .75 * 2**15 = 24576
    (0.5, (16384, 15)),
    (1 / 3, (21845, 16)),        # floor(log2 1/3) = -2 -> shift 16, 65536 / 3 = 21845.33 + .5 floors to 21845
    (32767.0, (32767, 0)),       # floor(log2) = 14 -> shift 0, mult 32767
    (2.0 ** -33, (16384, 47)),   # floor(log2) = -33 -> shift 47 exactly, no clamp
    (2.0 ** -40, (128, 47)),     # shift would be 54 > 47: clamp, mult = 2**-40 * 2**47 = 128
    (2.0 ** -50, (0, 47)),       # 2**-3 + .5 floors to 0
    (0.0, (0, 0)),               # documented zero case
])
def test_multiplier_for(ratio, want):
    assert nx.multiplier_for(ratio) == want


def test_multiplier_for_rounding_up_renormalises():
    # ratio just below 2: floor(log2) = 0 -> shift 14, 1.99999999 * 2**14 + .5 floors to 2**15, which is
    # outside [2**14, 2**15): halve to (16384, 13), i.e. exactly 2.0
    assert nx.multiplier_for(1.99999999) == (16384, 13)


@pytest.mark.parametrize("ratio", [2.0 ** 15, 40000.0, 1e12, 32767.9])  # 32767.9 rounds to 2**15 at shift 0
def test_multiplier_for_too_large_raises(ratio):
    with pytest.raises(ValueError, match="2\\*\\*15"):
        nx.multiplier_for(ratio)


@pytest.mark.parametrize("ratio", [-1.0, float("nan"), float("inf"), -0.5])
def test_multiplier_for_invalid_raises(ratio):
    with pytest.raises(ValueError):
        nx.multiplier_for(ratio)


@settings(max_examples=200, deadline=None)
@given(st.floats(min_value=2.0 ** -33, max_value=32767.0, allow_nan=False))
def test_multiplier_for_property(ratio):
    # docstring: mult in [2**14, 2**15), shift in [0, 47], and round-to-nearest: |mult - ratio*2**shift| <= 1/2
    mult, shift = nx.multiplier_for(ratio)
    assert 1 << 14 <= mult < 1 << 15 and 0 <= shift <= 47
    assert abs(mult - ratio * 2.0 ** shift) <= 0.5 + 1e-9 * mult


# ---- GELU --------------------------------------------------------------------------------------
def test_gelu_table_hand_values():
    # in_scale 1/16: index i -> x = i / 16 in [-8, 7.9375]; out_scale 1/16
    t = nx.gelu_table(1 / 16, 1 / 16)
    assert len(t) == 256
    # x = 0: gelu 0 -> 0 at index 0 + 128
    assert int(t[128]) == 0
    # x = -8: tanh(0.798 * (-8 - 0.0447 * 512)) = tanh(-24.6) = -1 to double precision -> y = -0.0 -> 0
    assert int(t[0]) == 0
    # x = 127/16: tanh(~24) = 1 -> y = x -> x / (1/16) = 127
    assert int(t[255]) == 127
    # x = 1 (i = 16): gelu_new(1) = 0.5 * (1 + tanh(0.79788 * 1.044715)) = 0.841192 -> 13.459 -> 13
    assert int(t[128 + 16]) == 13
    # x = -1: gelu_new(-x) = gelu_new(x) - x (tanh is odd) = -0.158808 -> -2.541 + .5 floors to -3
    assert int(t[128 - 16]) == -3
    # the lookup on the int8 ends and zero: gelu(-128) = t[0] = 0, gelu(0) = t[128] = 0, gelu(127) = t[255] = 127
    assert ints(nx.gelu([-128, 0, 127, 16, -16], t)) == [0, 0, 127, 13, -3]


def test_gelu_table_rounding_and_saturation():
    # in 1, out 0.01: gelu(1) / .01 = 84.119 -> 84; gelu(-1) / .01 = -15.88 -> -16
    t = nx.gelu_table(1.0, 0.01)
    assert int(t[129]) == 84 and int(t[127]) == -16
    # x = 2 / 0.01 = ~195.5 saturates; x = 127 -> 12700 saturates to 127; x = -128 -> ~0
    assert int(t[130]) == 127 and int(t[255]) == 127 and int(t[0]) == 0


def test_gelu_lookup_index():
    table = np.arange(256) * 3 - 300  # any table: gelu(x) must read entry x + 128
    assert ints(nx.gelu([-128, -1, 0, 127], table)) == [-300, 127 * 3 - 300, 128 * 3 - 300, 255 * 3 - 300]


# ---- rsqrt -------------------------------------------------------------------------------------
def test_rsqrt_table_ends():
    # 768 entries; entry 0: m_mid = 256 * 64 + 32 = 16416 = 2**14 (1 + 2**-9):
    #   2**23 / 2**7 * (1 + e)^-1/2 = 65536 (1 - 2**-10 + 3/8 2**-18 - ...) = 65536 - 64 + 0.094 = 65472.09 -> 65472
    # entry 767: m_mid = 1023 * 64 + 32 = 65504 = 2**16 (1 - 2**-11):
    #   2**23 / 2**8 * (1 + 2**-12 + ...) = 32768 + 8 + 0.003 -> 32776
    assert len(nx.RSQRT_TABLE) == 768
    assert int(nx.RSQRT_TABLE[0]) == 65472 and int(nx.RSQRT_TABLE[767]) == 32776


@pytest.mark.parametrize("k", [0, 1, 3, 7, 8, 13, 20, 28])
def test_rsqrt_powers_of_four(k):
    # u = 4**k = 2**2k: bit_length 2k + 1, t = (2k + 1 - 15) // 2 = k - 7, m = 2**2k / 4**t = 2**14,
    # index (2**14 >> 6) - 256 = 0 -> y = RSQRT_TABLE[0] = 65472 and 1/sqrt(u) = 2**-k ~ 65472 * 2**-(23 + t)
    y, t = nx.rsqrt(4 ** k)
    assert (int(y), int(t)) == (65472, k - 7)
    assert abs(int(y) * 2.0 ** -(23 + int(t)) / 2.0 ** -k - 1) <= 2.0 ** -9


def test_rsqrt_mantissa_top_and_odd_bit_length():
    # u = 2**16 - 1: bit_length 16, t = 0, m = 65535, index 1023 - 256 = 767 -> 32776
    assert tuple(map(int, nx.rsqrt(65535))) == (32776, 0)
    # u = 2**16: bit_length 17, t = 1, m = 2**16 >> 2 = 2**14 -> index 0
    assert tuple(map(int, nx.rsqrt(1 << 16))) == (65472, 1)
    # u = 2**15: bit_length 16, t = 0, m = 32768, index 512 - 256 = 256
    assert int(nx.rsqrt(1 << 15)[0]) == int(nx.RSQRT_TABLE[256])


# ---- LayerNorm ---------------------------------------------------------------------------------
def test_layernorm_eps_table():
    # E[sh] = max(1, round(eps d**2 2**(2 (16 - sh)))); eps 1e-5, d 2:
    # sh 0: 4e-5 * 2**32 = 171798.69 -> 171799; sh 1: 4e-5 * 2**30 = 42949.67 -> 42950;
    # sh 8: 4e-5 * 2**16 = 2.62 -> 3; sh 16: 4e-5 -> 0 -> max 1; sh 17 (x = -2**31 only): 1e-5 -> 1
    e = nx.layernorm_eps_table(1e-5, 2)
    # one entry per input shift layernorm_input_shift can return: 0..17 (bit_length(2**31) - 15 = 17)
    assert len(e) == nx.LN_MAX_SHIFT + 1 == 18
    assert (int(e[0]), int(e[1]), int(e[8]), int(e[16]), int(e[17])) == (171799, 42950, 3, 1, 1)


@pytest.mark.parametrize("row, want", [
    ([32767, -5], 0),         # bit_length(32767) = 15 -> fits int16 as is
    ([-32767, 0], 0),
    ([32768, 0], 1),          # 32768 > int16 max; 32768 >> 1 = 16384 fits
    ([0, -32769], 1),         # -32769 < int16 min; -32769 >> 1 = -16385 fits
    ([40000, 1], 1),
    ([1 << 20, 0], 6),        # 2**20 >> 6 = 2**14 fits, >> 5 = 2**15 does not
    ([I32_MAX, 0], 16),       # (2**31 - 1) >> 16 = 32767 fits, >> 15 = 65535 does not
    ([0, 0], 0),
])
def test_layernorm_input_shift(row, want):
    assert int(nx.layernorm_input_shift(np.array([row]))[0]) == want


@pytest.mark.parametrize("row, want", [
    # the rule is max(0, bit_length(max|x|) - 15), a leading-zero count of |x|; it is not always the
    # smallest shift that fits: a peak of exactly -2**15 already fits int16 but gets shift 1
    ([-32768, 0], 1),         # bit_length(32768) = 16 -> 1
    ([I32_MIN, 0], 17),       # bit_length(2**31) = 32 -> 17, the only row that needs eps entry 17
])
def test_layernorm_input_shift_negative_powers_of_two(row, want):
    assert int(nx.layernorm_input_shift(np.array([row]))[0]) == want


def test_layernorm_saturated_residual_row():
    # residual_add saturates to exactly -2**31, so such a row is reachable. bit_length(2**31) = 32 -> sh 17,
    # which must have an eps entry (LN_MAX_SHIFT = 17 since cdfc9a0; before, the table had 17 entries
    # and this row raised IndexError).
    eps = nx.layernorm_eps_table(1e-5, 4)
    x = np.array([[I32_MIN, 0, 5, -7]])
    # xs = [-16384, 0, 0, -1] (sh 17; sh 16 gives the same normalised row): mean -4096.25,
    # deviations [-12287.75, 4096.25, 4096.25, 4095.25], std = sqrt(201318400 / 4) = 7094.3,
    # n ~ 1024 * dev / std = [-1773.6, 591.3, 591.3, 591.1] (+- 2**-9 table error);
    # gamma 1, beta 0, out_shift 8: n / 256 = [-6.93, 2.31, 2.31, 2.31] -> [-7, 2, 2, 2]
    out = nx.layernorm(x, np.ones(4, np.int64), np.zeros(4, np.int64), 8, eps)
    assert ints(out) == [-7, 2, 2, 2]


def test_layernorm_zero_variance_row():
    # all equal: c = d * xs - S = 0 and V = 0, so n = 0 and out = saturate(round_shift(beta, out_shift), 8)
    d = 4
    beta = np.array([1000, -1000, 5 * 1024 + 512, 1 << 20])
    gamma = np.array([300, -7, 12345, 1])
    eps = nx.layernorm_eps_table(1e-5, d)
    for value in (0, 123456, -(1 << 30), I32_MAX):
        x = np.full((1, d), value)
        out = nx.layernorm(x, gamma, beta, 10, eps)
        # 1000: floor(1512/1024) = 1; -1000: floor(-488/1024) = -1; 5632: floor(6144/1024) = 6;
        # 2**20 -> 1024 saturates to 127
        assert ints(out) == [1, -1, 6, 127], value


def test_layernorm_two_elements_exact_rsqrt():
    # x = [2**20, -2**20]: peak 2**20 -> sh = 21 - 15 = 6, xs = [16384, -16384]
    # S = 0, Q = 2 * 2**28 = 2**29, c = 2 * xs = [32768, -32768], V = 2 Q - S**2 = 2**30
    # E[6] = 1 (every other entry huge, so the wrong index would show): u = 2**30 + 1,
    # bit_length 31 -> t = 8, m = u >> 16 = 16384 -> index 0, y = 65472 (test_rsqrt_table_ends)
    # n = round_shift(+-32768 * 65472, 23 + 8 - 10 = 21) = +-65472 / 64 = +-1023 exactly
    eps = np.full(nx.LN_MAX_SHIFT + 1, 1 << 40)  # one entry per input shift 0..17
    eps[6] = 1
    x = np.array([[1 << 20, -(1 << 20)]])
    # gamma 3, beta 100, out_shift 5: (3069 + 100 + 16) >> 5 = 99;  (-3069 + 100 + 16) >> 5 = floor(-92.3) = -93
    assert ints(nx.layernorm(x, [3, 3], [100, 100], 5, eps)) == [99, -93]
    # gamma 1, beta 0, out_shift 4: (1023 + 8) >> 4 = 64; (-1023 + 8) >> 4 = floor(-63.4) = -64
    assert ints(nx.layernorm(x, [1, 1], [0, 0], 4, eps)) == [64, -64]


def test_layernorm_two_elements_table_error():
    # x = [a, -a] with a = 1000: sh 0, S = 0, c = +-2a, V = 2 * 2a**2 = 4a**2, so c / sqrt(V) = +-1 and
    # n = +-2**10 up to the table's relative error 2**-9 (+-2) plus rounding: |n| in [1021, 1027]
    # with out_shift 4 every such n maps to +-64 ((1021 + 8) >> 4 = 64, (1027 + 8) >> 4 = 64,
    # (-1021 + 8) >> 4 = -64, (-1027 + 8) >> 4 = -64)
    eps = np.ones(nx.LN_MAX_SHIFT + 1, np.int64)
    assert ints(nx.layernorm(np.array([[1000, -1000]]), [1, 1], [0, 0], 4, eps)) == [64, -64]
    # and in batch with a second, zero-variance row: rows are independent
    x = np.array([[1000, -1000], [77, 77]])
    assert nx.layernorm(x, [1, 1], [0, 0], 4, eps).tolist() == [[64, -64], [0, 0]]


# ---- softmax -----------------------------------------------------------------------------------
def test_exp2_and_recip_tables():
    # exp2: f = 0 -> 2**15; f = 128 -> 2**15 / sqrt 2 = 23170.48 -> 23170; f = 255 -> 2**14 * 2**(1/256) = 16428.4
    assert len(nx.EXP2_TABLE) == 256
    assert (int(nx.EXP2_TABLE[0]), int(nx.EXP2_TABLE[128]), int(nx.EXP2_TABLE[255])) == (32768, 23170, 16428)
    # recip: idx 0 -> 2**31 / 32784 = 65536 (1 - 2**-11 + ...) = 65504.02 -> 65504
    #        idx 512 -> 2**31 / 49168 = 43690.67 (1 - 1/3072 + ...) = 43676.45 -> 43676
    assert len(nx.RECIP_TABLE) == 1024
    assert (int(nx.RECIP_TABLE[0]), int(nx.RECIP_TABLE[512])) == (65504, 43676)


def test_softmax_all_equal_row_of_four():
    # identity requantization (16384 / 2**14): z = 100 each, diff 0, e = 32768 each, S = 131072 = 2**17,
    # k = 18, mantissa S >> 2 = 32768 -> >> 5 = 1024 -> index 0, r = 65504,
    # p = round_shift(32768 * 65504, 18) = 65504 / 8 = 8188 exactly
    p = nx.softmax(np.full((1, 4), 100), np.ones((1, 4), bool), 16384, 14)
    assert ints(p) == [8188] * 4


def test_softmax_single_visible_and_masked():
    # one visible: e = 32768, S = 32768, k = 16, index (32768 >> 5) - 1024 = 0, r = 65504,
    # p = 32768 * 65504 / 2**16 = 32752; masked positions are 0 whatever their score
    p = nx.softmax(np.array([[5, 10 ** 6, -(10 ** 6)]]), np.array([[True, False, False]]), 16384, 14)
    assert ints(p) == [32752, 0, 0]
    assert ints(nx.softmax(np.array([[-7]]), np.array([[True]]), 16384, 14)) == [32752]


def test_softmax_fully_masked_row_is_zero():
    p = nx.softmax(np.array([[1, 2, 3], [4, 5, 6]]), np.array([[False] * 3, [True, False, False]]), 16384, 14)
    assert p.tolist() == [[0, 0, 0], [32752, 0, 0]]


def test_softmax_far_below_max_underflows():
    # z = [0, -4096]: diff = 4096, diff >> 8 = 16 -> e = 32768 >> 16 = 0 (and so for any larger diff)
    mask = np.ones((1, 2), bool)
    assert ints(nx.softmax(np.array([[0, -4096]]), mask, 16384, 14)) == [32752, 0]
    assert ints(nx.softmax(np.array([[0, -(1 << 30)]]), mask, 16384, 14)) == [32752, 0]
    # z = [0, -3840]: diff >> 8 = 15 -> e = 32768 >> 15 = 1; S = 32769, k = 16, index 0, r = 65504:
    # p0 = 32752, p1 = round_shift(65504, 16) = floor(98272 / 65536) = 1
    assert ints(nx.softmax(np.array([[0, -3840]]), mask, 16384, 14)) == [32752, 1]


def test_softmax_requantizes_scores_to_log2_units():
    # scores [512, 0] with ratio 1/2 -> z = [256, 0], i.e. one log2 unit apart:
    # e = [32768, EXP2[0] >> 1 = 16384], S = 49152, k = 16, index (49152 >> 5) - 1024 = 512, r = 43676,
    # p = [32768 * 43676 / 2**16 = 21838, 16384 * 43676 / 2**16 = 10919]
    p = nx.softmax(np.array([[512, 0]]), np.ones((1, 2), bool), 16384, 15)
    assert ints(p) == [21838, 10919]
    # the max need not be first, and the score sign does not matter: [-512, 0] -> z = [-256, 0]
    p = nx.softmax(np.array([[-512, 0]]), np.ones((1, 2), bool), 16384, 15)
    assert ints(p) == [10919, 21838]


def test_attention_scores_and_context():
    q = np.array([[1, 2], [-128, 127]])
    k = np.array([[3, 4], [-128, -128]])
    # q0.k0 = 3 + 8 = 11; q0.k1 = -128 - 256 = -384; q1.k0 = -384 + 508 = 124; q1.k1 = 16384 - 16256 = 128
    assert nx.attention_scores(q, k).tolist() == [[11, -384], [124, 128]]
    p = np.array([[32768, 0], [16384, 16384]])
    v = np.array([[1, -2], [3, 4]])
    # row 0: [32768, -65536]; row 1: [16384 + 49152, -32768 + 65536]
    assert nx.attention_context(p, v).tolist() == [[32768, -65536], [65536, 32768]]


@pytest.mark.parametrize("pos, n_keys, window, want", [
    ([0, 1, 2, 3], 4, 0, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]),  # causal
    ([0, 1, 2, 3], 4, 2, [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]),  # i - j < 2
    ([0, 1, 2, 3], 4, 1, [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]),  # itself only
    ([4], 5, 3, [[0, 0, 1, 1, 1]]),                     # a decode step at position 4: keys 2, 3, 4
    ([2, 3], 4, 0, [[1, 1, 1, 0], [1, 1, 1, 1]]),       # a chunk after two cached keys
    ([1], 2, 8, [[1, 1]]),                              # window longer than the context so far
])
def test_visible_keys(pos, n_keys, window, want):
    assert nx.visible_keys(np.array(pos), n_keys, window).astype(int).tolist() == want
