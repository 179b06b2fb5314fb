"""Run the Triton kernels on the CPU through Triton's interpreter (numpy), so that CI checks them without a GPU.

The interpreter must be switched on (TRITON_INTERPRET=1) before triton is first imported: triton.language's own
jit helpers (tl.cdiv, ...) are decorated at that import. Another test module may import triton first (the engine
does once it uses these kernels), so unless the variable was set for the whole session, the kernel test modules
are not collected here; test_interpreted.py runs each of them in a fresh Python process that sets it. The
compile-only test_hopper_build.py runs in the main process, where the kernels are compiled, not interpreted.

In the interpreted process three bugs of the Triton 3.6 interpreter are patched:
- a scalar loaded from memory is a 1-element array, which NumPy 2 no longer converts with int() (so it could not
  bound a loop);
- a bf16 tl.dot multiplies the operands' raw uint16 bits;
- float32 -> bf16/fp16/fp8 casts truncate, or round with a carry that corrupts the exponent, where the GPU
  rounds to nearest even. The patch casts through torch, whose casts round to nearest even like the GPU's.
None changes what the kernels compute, only how the interpreter evaluates it; the FP8 cast instruction
itself is checked on the GPU by gpu_tests/check_kernels.py. FP8 tl.dot operands need no patch: the interpreter
decodes e4m3 bytes itself (exactly, for all 256 of them) before its float32 matmul.
"""
from __future__ import annotations

import os

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
KERNEL_TEST_MODULES = ["test_paged_attention.py", "test_quant.py", "test_fp8_attention.py", "test_rotary.py",
                       "test_cudnn_attention.py", "test_fused_moe.py", "test_paged_prefill_attention.py"]
collect_ignore = ["test_interpreted.py", "test_hopper_build.py"] if INTERPRETED else KERNEL_TEST_MODULES

if INTERPRETED:
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    _TORCH_FLOAT = {tl.bfloat16: torch.bfloat16, tl.float16: torch.float16, tl.float8e4nv: torch.float8_e4m3fn,
                    tl.float8e5: torch.float8_e5m2}
    _UINT = {8: torch.uint8, 16: torch.uint16}
    _RTZ = interpreter._ir.ROUNDING_MODE.RTZ
    _interpreter_convert_float = interpreter._convert_float
    _interpreter_create_dot = interpreter.InterpreterBuilder.create_dot
    _interpreter_patch_lang_tensor = interpreter._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _interpreter_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    def _convert_float(data, input_dtype, output_dtype, rounding_mode):
        if input_dtype == tl.float32 and output_dtype in _TORCH_FLOAT and rounding_mode != _RTZ:
            cast = torch.from_numpy(np.ascontiguousarray(data).view(np.float32)).to(_TORCH_FLOAT[output_dtype])
            return cast.view(_UINT[output_dtype.primitive_bitwidth]).numpy().reshape(data.shape)
        return _interpreter_convert_float(data, input_dtype, output_dtype, rounding_mode)

    def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(t, tl.float32) if t.dtype.scalar == tl.bfloat16 else t for t in (a, b))
        return _interpreter_create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter._patch_lang_tensor = _patch_lang_tensor
    interpreter._convert_float = _convert_float
    interpreter.InterpreterBuilder.create_dot = _create_dot
