# Dots with an fp32 operand on 16-bit tensor cores. The kernels keep rank-r products (x A^T, dy B)
# and member sums in fp32; to multiply one by a 16-bit matrix without rounding it to 8 (bf16) or 11
# (fp16) mantissa bits, it is split into a high and a low 16-bit part, hi + lo equal to it to ~16
# bits, and run as two dots into the fp32 accumulator (the CUDA kernels do the same). fp16 covers
# only |v| <= 65504: a row of the fp32 operand that would overflow is first divided by a power of
# two, and the accumulator's row with it, and both are multiplied back after the dots; powers of
# two are exact, so rows in range get bit-identical results.
"""Triton helpers: dot products of an fp32 left operand with a 16-bit right operand."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["dot_fp32_lhs", "fp16_row_exponent", "pow2", "split16"]

# An fp16 row is scaled so that its largest finite |value| stays below 2^(this + 1) (fp16 max 65504).
_FP16_SAFE_EXPONENT = tl.constexpr(14)


@triton.jit
def pow2(exponent):
    """``2.0 ** exponent`` in fp32, exactly (built from the exponent bits); int32, -126..127."""
    return ((exponent + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def fp16_row_exponent(value):
    """Per row of ``value`` [BLOCK, COLS] fp32: the power of two to divide it by so that every
    finite entry stays below 2^15 in fp16 (0 for rows already in range; inf and NaN are ignored)."""
    finite = tl.where(tl.abs(value) < float("inf"), tl.abs(value), 0.0)
    row_max = tl.max(finite, axis=1)
    exponent = ((row_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.maximum(exponent - _FP16_SAFE_EXPONENT, 0)


@triton.jit
def split16(value, dtype: tl.constexpr):
    """``value`` (fp32) as high and low parts in the 16-bit ``dtype``, ``hi + lo`` equal to it to
    ~16 mantissa bits; an infinite value keeps ``lo = 0`` (inf - inf would be NaN)."""
    hi = value.to(dtype)
    hi32 = hi.to(tl.float32)
    lo = tl.where(tl.abs(hi32) < float("inf"), value - hi32, 0.0).to(dtype)
    return hi, lo


@triton.jit
def dot_fp32_lhs(lhs, rhs, acc, DOT_PRECISION: tl.constexpr):
    """``acc + lhs @ rhs`` for an fp32 ``lhs`` [BLOCK, K] (a rank-r product) and ``rhs`` [K, N] in the
    input dtype. fp32: one dot with DOT_PRECISION. 16-bit: ``lhs`` split into high and low parts
    (two tensor-core dots, near-fp32); in fp16, when some row of ``lhs`` would overflow, every row
    and the accumulator's row with it is first divided by a power of two, undone after the dots."""
    if rhs.dtype == tl.float32:
        return tl.dot(lhs, rhs, acc, input_precision=DOT_PRECISION)
    elif rhs.dtype == tl.float16:
        exponent = fp16_row_exponent(lhs)
        if tl.max(exponent, axis=0) > 0:
            down = pow2(-exponent)[:, None]
            hi, lo = split16(lhs * down, tl.float16)
            acc = tl.dot(lo, rhs, tl.dot(hi, rhs, acc * down)) * pow2(exponent)[:, None]
        else:
            hi, lo = split16(lhs, tl.float16)
            acc = tl.dot(lo, rhs, tl.dot(hi, rhs, acc))
        return acc
    else:
        hi, lo = split16(lhs, rhs.dtype)
        return tl.dot(lo, rhs, tl.dot(hi, rhs, acc))
