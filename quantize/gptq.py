"""Error-compensating (GPTQ) rounding of one weight matrix (Frantar et al. 2022, arXiv:2210.17323).

The matvec computes ``acc[o] = sum_i w[o, i] a[i]`` on int8 activations ``a``. Rounding a weight
moves ``acc`` by ``err * a[i]``; over the calibration tokens, the squared change of a row's output
is ``e^T H e`` with ``H = sum_tokens a a^T`` (the second moments of the matrix's integer input)
and ``e`` the row's rounding error. Nearest rounding minimises each ``e_i`` on its own. GPTQ rounds
the input columns one at a time in stream order, and moves each column's error onto the columns
not yet rounded, by the amount that cancels it best under ``H`` (the optimal-brain-surgeon update).
With ``H^-1 = U^T U`` (``U`` upper triangular: the Cholesky form of the inverse), the update after
column ``j`` is ``w[:, j+1:] -= (err_j / U[j, j]) * U[j, j+1:]``.

Rows are independent, so the whole matrix is done at once, BLOCK columns at a time (updates inside a
block are rank-1, the rest of the matrix is updated once per block by a matrix product). A group's
scale is chosen when its first column is reached, from the weights as updated so far, with the same
rule as nearest rounding. The integers returned are in the same ranges and formats as nearest
rounding; only which integers are stored differs.

Shapes: o = output rows, n = input columns (d_in), g = group size.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

DEFAULT_DAMPING = 0.01  # fraction of H's mean diagonal added to its diagonal
BLOCK = 32  # columns per lazy update; every group size (32/64/128) is a multiple
_BASE = 64  # below this size the recursive Cholesky hands over to LAPACK (larger sizes thread badly)


def hessian(acts) -> np.ndarray:  # [t, n] integer activations -> [n, n] float64, sum of a a^T
    a = np.asarray(acts, dtype=np.float64).reshape(-1, np.shape(acts)[-1])
    return a.T @ a


def _cholesky_and_inverse(h):  # [n, n] SPD -> (L, L^-1), both lower triangular
    """Recursive block Cholesky that also returns the factor's inverse, with matrix products only.

    LAPACK's own threaded Cholesky and inverse are much slower than BLAS products on a busy 2-core
    machine (seconds for n = 3072); this stays within products.
    """
    n = h.shape[0]
    if n <= _BASE:
        low = np.linalg.cholesky(h)
        return low, np.linalg.inv(low)
    k = n // 2
    l11, i11 = _cholesky_and_inverse(h[:k, :k])
    l21 = h[k:, :k] @ i11.T
    l22, i22 = _cholesky_and_inverse(h[k:, k:] - l21 @ l21.T)
    low, inv = np.zeros_like(h), np.zeros_like(h)
    low[:k, :k], low[k:, :k], low[k:, k:] = l11, l21, l22
    inv[:k, :k], inv[k:, :k], inv[k:, k:] = i11, -i22 @ l21 @ i11, i22
    return low, inv


def inverse_cholesky(h) -> np.ndarray:  # [n, n] SPD -> U [n, n] upper, H^-1 = U^T U
    """Raises numpy.linalg.LinAlgError when h is not positive definite.

    Reversing the order turns the lower Cholesky factor of the reversed H into the upper factor
    of H^-1: with P the reversal, P H P = L L^T gives H^-1 = (P L^-1 P)^T (P L^-1 P).
    """
    _, inv = _cholesky_and_inverse(np.ascontiguousarray(h[::-1, ::-1]))
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
    return np.eye(n), None


def round_compensated(w, u, group: int, step_for: Callable, lo: int, hi: int) -> tuple[np.ndarray, list]:
    """GPTQ rounding of w [o, n] float with U [n, n] from :func:`compensation_factor`.

    step_for(w_group [o, g], col_weight [g]) -> [o] is called at each group's first column with the
    group's weights as updated so far, and the weight of each column's squared rounding error in the
    loss (1 / U[j, j]^2), and returns the rounding step of those weights (the contract's scale rule).
    Each weight becomes clip(floor(w / step + 0.5), lo, hi), exactly as nearest rounding does, so
    U = I gives nearest rounding bit for bit. Returns (integers [o, n], [step [o] per group]).
    """
    o, n = w.shape
    if group % BLOCK and group < n:
        raise ValueError(f"group {group} is not a multiple of the {BLOCK}-column block")
    wt = np.array(np.asarray(w, dtype=np.float64).T)  # [n, o]: a column of w is a contiguous row here
    out = np.empty((n, o), dtype=np.int64)
    steps = []
    step = None
    for b0 in range(0, n, BLOCK):
        b1 = min(b0 + BLOCK, n)
        if b0 % group == 0:
            cols = slice(b0, min(b0 + group, n))
            step = np.asarray(step_for(wt[cols].T, 1.0 / np.diag(u)[cols] ** 2), dtype=np.float64)  # [o]
            steps.append(step)
        err = np.empty((b1 - b0, o))  # [block, o]: scaled errors, err_j / U[j, j]
        for j in range(b0, b1):
            q = np.clip(np.floor(wt[j] / step + 0.5), lo, hi)
            out[j] = q
            err[j - b0] = (wt[j] - q * step) / u[j, j]
            wt[j + 1:b1] -= u[j, j + 1:b1, None] * err[j - b0][None, :]
        if b1 < n:
            wt[b1:] -= u[b0:b1, b1:].T @ err
    return out.T, steps


def weighted_error(w, w_hat, h) -> float:  # [o, n], [o, n], [n, n] -> sum over rows of e^T H e
    e = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.einsum("oi,ij,oj->", e, np.asarray(h, np.float64), e))
