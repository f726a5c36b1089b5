"""Kernel-or-reference dispatch shared by the kernel modules.

Rule (every launcher follows it):
  use_triton=None  -> the Triton kernel iff every tensor is on CUDA, else the reference.
  use_triton=False -> the reference.
  use_triton=True  -> the Triton kernel; on CPU tensors this needs the Triton
                      interpreter, i.e. TRITON_INTERPRET=1 was set before `triton`
                      was first imported (triton.language's own @jit helpers and our
                      kernels are decorated at import) and stays set.
"""

from __future__ import annotations

import torch


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (runs on CPU via numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def patch_interpreter_bf16() -> None:
    """Make the Triton 3.x interpreter's bf16 arithmetic match the GPU's.

    The interpreter stores bf16 as uint16 and (a) computes tl.dot on bf16 operands
    as a matmul of the raw bits, (b) converts fp32 -> bf16 by truncation, where the
    GPU rounds to nearest even. Patched: (a) operands widened to fp32 first (exact,
    i.e. bf16 products with fp32 accumulation, as on the GPU), (b) round to nearest
    even. Only the interpreter (CPU, TRITON_INTERPRET=1) is touched; idempotent.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or getattr(builder, "_flexdraft_bf16_patched", False):
        return
    orig_dot, orig_cast = getattr(builder, "create_dot", None), getattr(builder, "cast_impl", None)
    if orig_dot is None or orig_cast is None or not hasattr(interpreter, "TensorHandle"):
        return  # another Triton version: nothing known to patch (bf16 kernel tests will say so)

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return orig_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            x = np.asarray(src.data, dtype=np.float32)
            bits = x.view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(x)
            if nan.any():
                rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._flexdraft_bf16_patched = True


def want_triton(kernel, tensors: list[torch.Tensor], use_triton: bool | None) -> bool:
    on_cuda = all(t.is_cuda for t in tensors)
    if use_triton is None:
        return on_cuda
    if not use_triton:
        return False
    if on_cuda:
        return True
    if is_interpreted(kernel):
        patch_interpreter_bf16()
        return True
    raise RuntimeError(
        "use_triton=True on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
        "before importing triton / flexdraft_kernels (kernels are decorated at import time)"
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()
