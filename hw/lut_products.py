"""Products of a value and a small signed integer as shifted partial products, in LUTs (no
multiplier block): the per-lane products of MatVec, AttnScores and AttnContext."""

from __future__ import annotations

from amaranth import Mux

__all__ = ["mul_int4", "mul_int8_pairs"]


def mul_int4(a, w):
    """``a * w`` for an int8 ``a`` and an int4 ``w`` (two's complement) as a sum of shifted partial
    products."""
    pp = [Mux(w[k], a, 0) << k for k in range(3)]
    return (pp[0] + pp[1]) + (pp[2] - (Mux(w[3], a, 0) << 3))


def mul_int8_pairs(a, b):
    """Four terms whose sum is ``a * b`` for a signed or unsigned ``a`` and an int8 ``b``: the
    partial products ``b[j] * a << j`` (the sign bit's negated), added in pairs, for a register
    stage between the pairs and their sum. On the ECP5 proxy a multiplier block sits wherever the
    placer finds a free one, far from these lanes' registers and adder trees (docs/engine.md)."""
    pp = [Mux(b[j], a, 0) << j for j in range(7)] + [-(Mux(b[7], a, 0) << 7)]
    return [pp[0] + pp[1], pp[2] + pp[3], pp[4] + pp[5], pp[6] + pp[7]]
