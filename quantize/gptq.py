"""Error-compensating (GPTQ) rounding of one weight matrix (Frantar et al. 2022, arXiv:2210.17323).

The matvec computes ``acc[o] = sum_i w[o, i] a[i]`` on int8 activations ``a``. Rounding a weight
moves ``acc`` by ``err * a[i]``; over the calibration tokens, the squared change of a row's output
is ``e^T H e`` with ``H = sum_tokens a a^T`` (the second moments of the matrix's integer input)
and ``e`` the row's rounding error. Nearest rounding minimises each ``e_i`` on its own. GPTQ rounds
the input columns one at a time in stream order, and moves each column's error onto the columns
not yet rounded, by the amount that cancels it best under ``H`` (the optimal-brain-surgeon update).
With ``H^-1 = U^T U`` (``U`` upper triangular: the Cholesky form of the inverse), the update after
column ``j`` is ``w[:, j+1:] -= (err_j / U[j, j]) * U[j, j+1:]``.

Rows are independent, so a chunk of rows is done at once, BLOCK columns at a time: inside a block
the updates are recursive halves (a matrix product from each first half to its second half,
rank-1 below 4 columns), and the rest of the matrix is updated once per block by a float32
product. A group's scale is chosen when its first column is reached, from the weights as updated
so far, with the same rule as nearest rounding. The integers returned are in the same ranges and
formats as nearest rounding; only which integers are stored differs.

Shapes: o = output rows, n = input columns (d_in), g = group size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_DAMPING = 0.01  # fraction of H's mean diagonal added to its diagonal
BLOCK = 32  # columns per lazy update; every group size (32/64/128) is a multiple
CHUNK_ELEMENTS = 1 << 21  # weights rounded together (16 MB of float64): bounded temporaries, warm caches
_BASE = 128  # below this size the recursive Cholesky hands over to LAPACK


def hessian(acts) -> np.ndarray:  # [t, n] integer activations -> [n, n] float64, sum of a a^T
    """Exact for int8 activations: float32 products of int8 values and their sums stay below 2^24
    for up to 1024 tokens per call, so the float32 BLAS product is exact and then widened."""
    a = np.asarray(acts).reshape(-1, np.shape(acts)[-1])
    total = np.zeros((a.shape[1], a.shape[1]))
    for t0 in range(0, a.shape[0], 1024):  # 1024 * 127^2 < 2^24: every partial sum is an exact float32
        part = a[t0:t0 + 1024].astype(np.float32)
        total += part.T @ part
    return total


def _cholesky_and_inverse(h, low, inv) -> None:  # [n, n] SPD -> fills L and L^-1 (lower, zero above)
    """Recursive block Cholesky that also gives the factor's inverse, with matrix products only.

    LAPACK's Cholesky is fine, but numpy has no triangular inverse (np.linalg.inv runs a general LU,
    several times slower); halving and two products per level keep it all in BLAS.
    """
    n = h.shape[0]
    if n <= _BASE:
        low[:] = np.linalg.cholesky(h)
        inv[:] = np.tril(np.linalg.inv(low))  # LU leaves rounding noise above the diagonal
        return
    k = n // 2
    _cholesky_and_inverse(h[:k, :k], low[:k, :k], inv[:k, :k])
    l21 = low[k:, :k]
    np.matmul(h[k:, :k], inv[:k, :k].T, out=l21)
    _cholesky_and_inverse(h[k:, k:] - l21 @ l21.T, low[k:, k:], inv[k:, k:])
    inv[k:, :k] = -(inv[k:, k:] @ l21) @ inv[:k, :k]


def inverse_cholesky(h, dtype=np.float32) -> np.ndarray:  # [n, n] SPD -> U [n, n] upper, H^-1 = U^T U
    """Raises numpy.linalg.LinAlgError when h is not positive definite (at this precision).

    Reversing the order turns the lower Cholesky factor of the reversed H into the upper factor
    of H^-1: with P the reversal, P H P = L L^T gives H^-1 = (P L^-1 P)^T (P L^-1 P).
    float32 by default: U only steers which integers are stored (any U keeps them in range), and the
    factorisation of a damped H is as accurate in float32 as the reference GPTQ implementation's.
    """
    n = h.shape[0]
    low, inv = np.zeros((n, n), dtype), np.zeros((n, n), dtype)
    _cholesky_and_inverse(np.ascontiguousarray(h[::-1, ::-1], dtype=dtype), low, inv)
    u = inv[::-1, ::-1]
    if not np.all(np.isfinite(u)):
        raise np.linalg.LinAlgError("non-finite inverse")
    return np.ascontiguousarray(u)


def compensation_factor(h, damping: float = DEFAULT_DAMPING) -> tuple[np.ndarray, float | None]:
    """U for :func:`round_compensated` from H, and the damping actually used (None: none worked).

    A dead input (zero diagonal: the input was 0 on every calibration token) has nothing to carry
    error through: its row and column are cleared and its diagonal set to 1, so that column is
    rounded to nearest and passes no error on. When H with the requested damping is not positive
    definite (too few calibration tokens, a degenerate input), the damping is raised step by step;
    if nothing works, U = I, which is nearest rounding.
    """
    h = np.array(h, dtype=np.float64)  # [n, n]
    n = h.shape[0]
    dead = ~(np.diag(h) > 0)
    h[dead, :], h[:, dead] = 0.0, 0.0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    for lam in dict.fromkeys((damping, max(10 * damping, 1e-4), max(100 * damping, 1e-2), 1.0)):
        try:
            return inverse_cholesky(h + lam * mean_diag * np.eye(n)), lam
        except np.linalg.LinAlgError:
            continue
    return np.eye(n, dtype=np.float32), None


def round_compensated(w, u, group: int, step_for: Callable, lo: int, hi: int) -> tuple[np.ndarray, list]:
    """GPTQ rounding of w [o, n] float with U [n, n] from :func:`compensation_factor`.

    step_for(w_group [r, g], col_weight [g], rows) is called at each group's first column with the
    group's weights (rows `rows` of w, a slice) as updated so far, and the weight of each column's
    squared rounding error in the loss (1 / U[j, j]^2), and returns the rounding step of those
    weights (the contract's scale rule), [r]. Each weight becomes clip(floor(w / step + 0.5), lo,
    hi), exactly as nearest rounding does, so U = I gives nearest rounding bit for bit: the weights
    stay float64 and only the updates carried across blocks are float32 (zero when U = I). Rows
    are independent and go in chunks (:func:`row_chunks`). Returns (integers [o, n] int8,
    [step [o] per group]).
    """
    o, n = w.shape
    if group % BLOCK and group < n:
        raise ValueError(f"group {group} is not a multiple of the {BLOCK}-column block")
    w = np.asarray(w, dtype=np.float64)
    u64, u32 = np.asarray(u, dtype=np.float64), np.asarray(u, dtype=np.float32)
    col_weight = 1.0 / np.diag(u64) ** 2  # [n]
    out = np.empty((o, n), dtype=np.int8)
    steps = [np.empty(o) for _ in range(0, n, group)]
    for rows in row_chunks(o, n):
        wt = np.ascontiguousarray(w[rows].T)  # [n, r]: a column of w is a contiguous row here
        carried = np.zeros(wt.shape, np.float32)  # [n, r] updates from earlier blocks, not yet applied
        out_t = np.empty(wt.shape, np.int8)
        for b0 in range(0, n, BLOCK):
            b1 = min(b0 + BLOCK, n)
            if b0 % group == 0:
                cols = slice(b0, min(b0 + group, n))
                step = np.asarray(step_for((wt[cols] - carried[cols]).T, col_weight[cols], rows), np.float64)
                steps[b0 // group][rows] = step
            blk = wt[b0:b1] - carried[b0:b1]  # [b, r] the block's weights as updated so far
            err = np.empty(blk.shape)  # [b, r] scaled errors err_j / U[j, j]
            _round_block(blk, err, out_t[b0:b1], u64[b0:b1, b0:b1], step, lo, hi)
            if b1 < n:
                carried[b1:] += u32[b0:b1, b1:].T @ err.astype(np.float32)
        out[rows] = out_t.T
    return out, steps


def _round_block(blk, err, out, u, step, lo: int, hi: int) -> None:  # [b, r], [b, r], [b, r], [b, b], [r]
    """Round a block's columns in turn, carrying each one's error onto the block's later columns.

    Halves recursively: after the first half is rounded its errors reach the second half by one
    matrix product; only runs of at most 4 columns go one by one (rank-1 updates).
    """
    b = blk.shape[0]
    if b > 4:
        k = b // 2
        _round_block(blk[:k], err[:k], out[:k], u[:k, :k], step, lo, hi)
        blk[k:] -= u[:k, k:].T @ err[:k]
        _round_block(blk[k:], err[k:], out[k:], u[k:, k:], step, lo, hi)
        return
    for j in range(b):
        q = np.floor(blk[j] / step + 0.5)
        np.minimum(np.maximum(q, lo, out=q), hi, out=q)  # np.clip, without its wrapper's overhead
        out[j] = q
        err[j] = (blk[j] - q * step) / u[j, j]
        if j + 1 < b:
            blk[j + 1:] -= u[j, j + 1:, None] * err[j][None, :]


def row_chunks(o: int, n: int) -> list[slice]:
    """Slices of about CHUNK_ELEMENTS weights each (whole rows) covering o rows of n inputs."""
    k = -(-o * n // CHUNK_ELEMENTS)
    size = -(-o // k)
    return [slice(r0, min(r0 + size, o)) for r0 in range(0, o, size)]


def weighted_error(w, w_hat, h) -> float:  # [o, n], [o, n], [n, n] -> sum over rows of e^T H e
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("oi,ij,oj->", e, np.asarray(h, np.float64), e))
