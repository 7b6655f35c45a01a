"""Tensor-core rounding of Triton's float32 ``tl.dot``, emulated for ``TRITON_INTERPRET=1`` tests.

The interpreter multiplies float32 tiles exactly (numpy) whatever ``input_precision`` says, so
a CPU test of a kernel's TF32 / 3×TF32 accuracy patches the interpreter's dot to round the
operands as the GPU path does (Triton 3.7, NVIDIA):

* ``"tf32"``: the float32 bits go to the tensor cores, which read sign, exponent and the top
  10 mantissa bits (the low 13 bits are ignored: truncation).
* ``"tf32x3"`` (Triton's F32DotTC pass): ``a_hi = cvt.rna.tf32(a)`` (round to nearest, ties
  away), ``a_lo = a - a_hi``, and ``dot(a_lo, b_hi) + dot(a_hi, b_lo) + dot(a_hi, b_hi)`` as three
  TF32 products (so ``a_lo`` is truncated too).

Products of the MMAs accumulate in float32 here (numpy); the hardware's accumulation order differs,
which is float32 round-off, far below the effects emulated.

    import tensor_core_emulation; tensor_core_emulation.install()   # after TRITON_INTERPRET=1
"""

from __future__ import annotations

import numpy as np

_LOW13 = np.uint32(0x1FFF)


def tf32_truncate(x: np.ndarray) -> np.ndarray:
    """float32 → the TF32 value the tensor cores read (low 13 mantissa bits dropped).

    Example:
        >>> float(tf32_truncate(np.float32([1 + 2**-10 + 2**-11]))[0]) == 1 + 2**-10
        True
    """
    return (np.ascontiguousarray(x, np.float32).view(np.uint32) & ~_LOW13).view(np.float32)


def tf32_round(x: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32``: float32 → nearest TF32 value, ties away from zero (finite inputs).

    Example:
        >>> float(tf32_round(np.float32([1 + 2**-11]))[0]) == 1 + 2**-10   # a tie rounds away
        True
    """
    u = np.ascontiguousarray(x, np.float32).view(np.uint32)
    return ((u + np.uint32(0x1000)) & ~_LOW13).view(np.float32)  # half an ulp of TF32 added to the magnitude


def tf32_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.matmul(tf32_truncate(a), tf32_truncate(b), dtype=np.float32)


def tf32x3_dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a_hi, b_hi = tf32_round(a), tf32_round(b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return tf32_dot(a_lo, b_hi) + tf32_dot(a_hi, b_lo) + tf32_dot(a_hi, b_hi)


def install() -> None:
    """Patch the Triton interpreter's ``tl.dot`` on float32 tiles to emulate ``"tf32"`` and ``"tf32x3"``."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    exact = interpreter.InterpreterBuilder.create_dot
    products = {ir.INPUT_PRECISION.TF32: tf32_dot, ir.INPUT_PRECISION.TF32x3: tf32x3_dot}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001, ANN202
        product = products.get(input_precision)
        if product is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return exact(self, a, b, d, input_precision, max_num_imprecise_acc)
        return interpreter.TensorHandle(product(a.data, b.data) + d.data, d.dtype.scalar)

    interpreter.InterpreterBuilder.create_dot = create_dot
