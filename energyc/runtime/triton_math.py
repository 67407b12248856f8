"""Element-wise functions for Triton kernels that ``triton.language`` lacks or computes badly.

The Triton printer (``energyc.backends.triton_printer``) spells these SymPy functions as calls
of the ``@triton.jit`` functions here (generated modules import this module as ``_tm``), so an
argument is computed once, however many times a formula reads it. Each works in its argument's
dtype (the kernels' ``ACC``: fp32, or fp64 for float64 inputs) and is accurate to a few units in
the last place of that dtype for every argument whose value is finite in it: no intermediate
overflows before the value does, no cancellation where the value is small. The identities used:

    log1p(x)   = log(v) - ((v - 1) - x) / v,  v = 1 + x  (the rounding error of v corrected;
                 Sterbenz: v - 1 is exact for v in [1/2, 2])
    softplus u = max(u, 0) + log1p(exp(-|u|))
    sinh u     = sign(u) (p - 1 / (4 p)),  p = e^|u| / 2 = (e^(|u|/2) / 2) e^(|u|/2), |u| >= 1/2
                 (p overflows where sinh does, not at e^|u|'s 88.7 in fp32);
                 u (1 + z/6 (1 + z/20 (1 + z/42 (...)))), z = u^2: its series, |u| < 1/2
    cosh u     = p + 1 / (4 p)
    tanh u     = sign(u) (1 - q) / (1 + q),  q = e^(-2|u|), |u| >= 1/2 (q -> 0: never inf/inf);
                 sinh u / cosh u by the series, |u| < 1/2
    tan u      = sin u / cos u
    atan u     = sign(u) (y0 + t + t z P(z) / Q(z)),  z = t^2, |u| reduced to |t| <= 0.66 by
                 atan a = pi/2 + atan(-1/a) (a > tan 3pi/8), pi/4 + atan((a - 1) / (a + 1))
                 (a > 0.66): Cephes' atan, rational P / Q of degrees 4 / 5
    asinh u    = sign(u) log1p(a + a^2 / (1 + sqrt(1 + a^2))),  a = |u| (= log(a + sqrt(a^2 + 1)));
                 log(a) + log 2 for a > 2^28, where a^2 would overflow in fp32 before long
    erfc u     = t e^(-u^2) e^(g(t)),  t = 2 / (2 + u), u >= 0, g a Chebyshev series in
                 2t - 1 (28 terms, Numerical Recipes' erfccheb: 1 - erf(u) would lose every
                 digit for u > 4 in fp32); erfc(-u) = 2 - erfc(u)
    u**n       = prod over the bits k of n of u**(2**k)  (n a constant >= 1: repeated squaring)
    u**v       = e^(v log|u|), negated for u < 0 and odd integer v, NaN for u < 0 and
                 non-integer v, 1 for v = 0: torch.pow's values (a constant u < 0 by its log)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """log(1 + x) for x >= -1."""
    v = 1.0 + x
    lv = tl.log(v)
    c = (v - 1.0) - x  # the rounding error of v; 0 where v = 1 + x exactly (and at x = -1)
    return tl.where((c == 0.0) | (v == x), lv, lv - c / v)


@triton.jit
def softplus(u):
    """log(1 + e^u) = max(u, 0) + log1p(e^(-|u|)): no overflow, relative accuracy for u < 0."""
    return tl.maximum(u, 0.0) + log1p(tl.exp(-tl.abs(u)))


@triton.jit
def _sinh_series(u):
    """sinh u = sum_k u^(2k+1) / (2k+1)!, to u^13: within 5e-17 relative for |u| < 1/2."""
    z = u * u
    s = 1.0 + z / 156.0
    s = 1.0 + z / 110.0 * s
    s = 1.0 + z / 72.0 * s
    s = 1.0 + z / 42.0 * s
    s = 1.0 + z / 20.0 * s
    s = 1.0 + z / 6.0 * s
    return u * s


@triton.jit
def _half_exp(a):
    """e^a / 2 for a >= 0, overflowing only where e^a / 2 does."""
    h = tl.exp(0.5 * a)
    return (0.5 * h) * h


@triton.jit
def sinh(u):
    """sinh u: the series for |u| < 1/2, p - 1/(4p) with p = e^|u| / 2 beyond, signed."""
    a = tl.abs(u)
    p = _half_exp(a)
    s = tl.where(a < 0.5, _sinh_series(a), p - 0.25 / p)
    return tl.where(u < 0, -s, s)


@triton.jit
def cosh(u):
    """cosh u = p + 1/(4p), p = e^|u| / 2."""
    p = _half_exp(tl.abs(u))
    return p + 0.25 / p


@triton.jit
def tanh(u):
    """tanh u: sinh / cosh by the series for |u| < 1/2, (1 - q) / (1 + q) with q = e^(-2|u|)
    beyond (1 for large |u|, never inf / inf), signed."""
    a = tl.abs(u)
    q = tl.exp(-2.0 * a)
    p = _half_exp(tl.minimum(a, 0.5))
    t = tl.where(a < 0.5, _sinh_series(a) / (p + 0.25 / p), (1.0 - q) / (1.0 + q))
    return tl.where(u < 0, -t, t)


@triton.jit
def tan(u):
    """tan u = sin u / cos u."""
    return tl.sin(u) / tl.cos(u)


@triton.jit
def atan(u):
    """atan u, Cephes' reduction and rational approximation (within 2e-16 relative in fp64)."""
    a = tl.abs(u)
    big = a > 2.414213562373095  # tan(3 pi / 8)
    mid = a > 0.66
    t = tl.where(big, -1.0 / tl.where(big, a, 1.0), tl.where(mid, (a - 1.0) / (a + 1.0), a))
    # y0 = k pi / 4 with k = 2, 1, 0 (a where of two numbers is fp32: k is exact, pi / 4 not)
    k = tl.where(big, 2.0, tl.where(mid, 1.0, 0.0)).to(a.dtype)
    y0 = k * 0.7853981633974483
    extra = k * 3.061616997868383e-17  # the bits of pi / 4 beyond fp64's (Cephes' MOREBITS / 2)
    z = t * t
    p = -8.750608600031904e-01 * z - 1.615753718733365e01
    p = p * z - 7.500855792314705e01
    p = p * z - 1.228866684490136e02
    p = p * z - 6.485021904942025e01
    q = z + 2.485846490142306e01
    q = q * z + 1.650270098316988e02
    q = q * z + 4.328810604912903e02
    q = q * z + 4.853903996359137e02
    q = q * z + 1.945506571482614e02
    r = y0 + ((t + t * (z * p / q)) + extra)
    return tl.where(u < 0, -r, r)


@triton.jit
def asinh(u):
    """asinh u = log1p(a + a^2 / (1 + sqrt(1 + a^2))), a = |u| (log a + log 2 beyond 2^28)."""
    a = tl.abs(u)
    small = tl.where(a > 268435456.0, 268435456.0, a)  # a where, not a minimum: NaN stays
    r = log1p(small + small * small / (1.0 + tl.sqrt(1.0 + small * small)))
    r = tl.where(a > 268435456.0, tl.log(a) + 0.6931471805599453, r)
    return tl.where(u < 0, -r, r)


@triton.jit
def _clenshaw(d, dd, ty, C: tl.constexpr):
    """One step of Clenshaw's recurrence (b_k = 2y b_{k+1} - b_{k+2} + c_k, ty = 2y)."""
    return ty * d - dd + C, d


@triton.jit
def erfc(u):
    """erfc u = t e^(-u^2) e^(g(t)), t = 2 / (2 + |u|), for u >= 0; 2 - erfc(-u) for u < 0
    (e^(-u^2) apart: rounding the exponent u^2 + g would cost |u^2| units in the last place).
    g(t) = c_0 / 2 + sum_k c_k T_k(2t - 1) (Numerical Recipes' erfccheb, its coefficients
    recomputed with mpmath: the terms left off sum to 3e-18)."""
    a = tl.abs(u)
    a = tl.where(a > 30.0, 30.0, a)  # erfc(30) = 3e-393, 0 in fp64 too; no inf in u^2 (NaN kept)
    t = 2.0 / (2.0 + a)
    ty = 4.0 * t - 2.0
    d = 0.0 * t
    dd = 0.0 * t
    d, dd = _clenshaw(d, dd, ty, -2.816663087747177e-17)
    d, dd = _clenshaw(d, dd, ty, 1.210237189224279e-16)
    d, dd = _clenshaw(d, dd, ty, -9.457494571291233e-17)
    d, dd = _clenshaw(d, dd, ty, -1.5230282014571043e-15)
    d, dd = _clenshaw(d, dd, ty, 7.106097613609237e-15)
    d, dd = _clenshaw(d, dd, ty, 3.810905255189232e-16)
    d, dd = _clenshaw(d, dd, ty, -1.1270822361367252e-13)
    d, dd = _clenshaw(d, dd, ty, 3.130921399342958e-13)
    d, dd = _clenshaw(d, dd, ty, 8.944879273090725e-13)
    d, dd = _clenshaw(d, dd, ty, -6.886027526497553e-12)
    d, dd = _clenshaw(d, dd, ty, 2.3940380830391146e-12)
    d, dd = _clenshaw(d, dd, ty, 9.646791102015527e-11)
    d, dd = _clenshaw(d, dd, ty, -2.273651222931836e-10)
    d, dd = _clenshaw(d, dd, ty, -9.91364156493033e-10)
    d, dd = _clenshaw(d, dd, ty, 5.059343495551469e-09)
    d, dd = _clenshaw(d, dd, ty, 6.5290544390988515e-09)
    d, dd = _clenshaw(d, dd, ty, -8.523809591492654e-08)
    d, dd = _clenshaw(d, dd, ty, 1.5626441722066142e-08)
    d, dd = _clenshaw(d, dd, ty, 1.3036558355805232e-06)
    d, dd = _clenshaw(d, dd, ty, -1.6242900046470256e-06)
    d, dd = _clenshaw(d, dd, ty, -2.0278578112534242e-05)
    d, dd = _clenshaw(d, dd, ty, 4.252332480690777e-05)
    d, dd = _clenshaw(d, dd, ty, 0.00036683949785276145)
    d, dd = _clenshaw(d, dd, ty, -0.0009465953444820369)
    d, dd = _clenshaw(d, dd, ty, -0.009561514786808632)
    d, dd = _clenshaw(d, dd, ty, 0.019476473204185836)
    d, dd = _clenshaw(d, dd, ty, 0.6419697923564902)
    sq = a * a
    sq_error = tl.fma(a, a, -sq)  # a^2 = sq + sq_error exactly
    r = t * tl.exp(-sq) * tl.exp(0.5 * (-1.3026537197817094 + ty * d) - dd - sq_error)
    return tl.where(u < 0, 2.0 - r, r)


@triton.jit
def sign(u):
    """-1, 0 or 1 (u itself at 0 and NaN, as torch.sign)."""
    return tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, u))


@triton.jit
def heaviside(u, H0: tl.constexpr):
    """0 for u < 0, H0 at 0, 1 for u > 0 (NaN for NaN, as torch.heaviside)."""
    return tl.where(u > 0, 1.0, tl.where(u < 0, 0.0, tl.where(u == 0, H0, u)))


@triton.jit
def ipow(u, N: tl.constexpr):
    """u**N for a constant integer N >= 1, by repeated squaring (about log2 N roundings)."""
    r = tl.full(u.shape, 1.0, u.dtype)
    p = u
    for k in tl.static_range(62):
        if (N >> k) > 0:
            if (N >> k) & 1:
                r = r * p
            if (N >> (k + 1)) > 0:
                p = p * p
    return r


@triton.jit
def _negative_base(r, v):
    """u**v for u < 0 from r = |u|**v: -r for odd integer v, r for even, NaN otherwise."""
    whole = tl.floor(v) == v
    odd = whole & (tl.floor(0.5 * v) != 0.5 * v)
    return tl.where(whole, tl.where(odd, -r, r), float("nan"))


@triton.jit
def power(u, v):
    """u**v for any real v (a tensor): e^(v log|u|), signed for u < 0 and odd integer v, NaN
    for u < 0 and non-integer v, 1 for v = 0 (0**v: 0 for v > 0, inf for v < 0)."""
    r = tl.exp(v * tl.log(tl.abs(u)))
    r = tl.where(u < 0, _negative_base(r, v), r)
    return tl.where(v == 0, 1.0, r)


@triton.jit
def power_of_negative(v, LOG_ABS_BASE: tl.constexpr):
    """c**v for a constant c < 0, LOG_ABS_BASE = log|c| (a constant: exact in fp64 too, where
    c as an argument would be an fp32 scalar)."""
    return _negative_base(tl.exp(v * LOG_ABS_BASE), v)
