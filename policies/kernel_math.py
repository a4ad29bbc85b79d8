"""The compiled kernels' elementwise math (``policies.lru_fused``): erf and e^x as numba
functions that LLVM can vectorise.

``erf_scalar`` and ``exp_scalar`` are for use inside ``numba.njit`` code, where they are
inlined: in float32 erf is Eigen's rational approximation (``generic_fast_erf_float``) and
e^x Cephes' ``expf`` for x ≤ 0 (both < 1e-6 off, branch-free; the C export's
``cm_erf`` and ``cm_exp_nonpositive`` use the same polynomials), in float64 ``math.erf``
and ``math.exp``. ``erf`` and ``exp`` apply them to a 1-D array (tested in
``tests/test_lru_fused.py``).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def erf_scalar(x):  # pragma: no cover - replaced inside compiled code by the overload below
    return math.erf(x)


@overload(erf_scalar, inline="always")
def _erf_overload(x):
    if x == types.float32:
        # Eigen's generic_fast_erf_float: x·P(x²)/Q(x²) on [-4, 4] (erf = ±1 beyond).
        def fast(x):
            x = min(max(x, np.float32(-4.0)), np.float32(4.0))
            x2 = x * x
            p = x2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
            p = x2 * p + np.float32(-2.10102402082508e-06)
            p = x2 * p + np.float32(-5.69250639462346e-05)
            p = x2 * p + np.float32(-7.34990630326855e-04)
            p = x2 * p + np.float32(-2.95459980854025e-03)
            p = x2 * p + np.float32(-1.60960333262415e-02)
            q = x2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
            q = x2 * q + np.float32(-1.68282697438203e-03)
            q = x2 * q + np.float32(-7.37332916720468e-03)
            q = x2 * q + np.float32(-1.42647390514189e-02)
            return x * p / q

        return fast
    return lambda x: math.erf(x)


def exp_scalar(x):  # pragma: no cover - replaced inside compiled code by the overload below
    return math.exp(x)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 ``bits`` (a bitcast LLVM can vectorise)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@overload(exp_scalar, inline="always")
def _exp_overload(x):
    if x == types.float32:
        # Cephes' expf: e^x = 2^k e^f, |f| ≤ ln2/2, e^f by a degree-7 polynomial (relative
        # error ~1e-7), 2^k by writing the exponent bits. For x ≤ 0 (GELU' uses e^{-v²/2}).
        def fast(x):
            x = max(x, np.float32(-87.0))
            k = np.floor(x * np.float32(1.4426950408889634) + np.float32(0.5))
            f = x - k * np.float32(0.693359375) + k * np.float32(2.12194440e-4)
            p = np.float32(1.9875691500e-4) * f + np.float32(1.3981999507e-3)
            p = p * f + np.float32(8.3334519073e-3)
            p = p * f + np.float32(4.1665795894e-2)
            p = p * f + np.float32(1.6666665459e-1)
            p = p * f + np.float32(5.0000001201e-1)
            p = p * f * f + f + np.float32(1.0)
            return p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))

        return fast
    return lambda x: math.exp(x)


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def exp(x: np.ndarray) -> np.ndarray:
    """The kernels' exp on a 1-D array of values ≤ 0 (float32: the approximation)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = exp_scalar(x[i])
    return out


@numba.njit(cache=True, nogil=True, fastmath=True, error_model="numpy")
def erf(x: np.ndarray) -> np.ndarray:
    """The kernels' erf on a 1-D array (float32: the approximation; float64: exact)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = erf_scalar(x[i])
    return out
