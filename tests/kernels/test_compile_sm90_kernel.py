"""Every kernel variant the launchers produce, compiled for an H100 (sm_90) by Triton's CUDA
backend down to a cubin (ptxas included), with no GPU present.

The interpreter accepts programs a GPU rejects; this catches those: tl.dot operands under 16,
loop-carried values that change type, unsupported ops, and tiles whose pipelined buffers exceed
the 227 KiB of shared memory a Hopper block may use. Launchers run on CPU tensors with launches
turned into compile-only calls, so the variants compiled are exactly those the GPU path builds.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from kernel_harness import check_verdict, run_worker, worker_main  # noqa: E402

HOPPER_SHARED_BYTES = 232448
CASES = []
for dtype in ("f16", "bf16", "f32"):
    for op, sizes in (("prefill", (64, 128, 256)), ("decode", (64, 128, 256)), ("exit", (8, 64)),
                      ("fused", (128,))):
        for size in sizes:
            CASES.append(dict(id=f"{op}-{dtype}-{size}", op=op, dtype=dtype, size=size))

_COMPILED: list = []


def _compile_only_for_sm90() -> None:
    """Point Triton at an sm_90 target and make every launch compile and return without running."""
    from kernel_harness import SkipCase

    try:
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.runtime import driver
        from triton.runtime.jit import JITFunction
    except ImportError as err:
        raise SkipCase(f"this triton has no CUDA compiler interface: {err}")
    if "nvidia" not in backends:
        raise SkipCase("this triton build has no NVIDIA backend")

    class Sm90Target:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        _COMPILED.append((self.fn.__name__, kernel))
        return kernel

    driver.set_active(Sm90Target())
    JITFunction.run = compile_only


def _launch(op: str, dtype, size: int) -> None:
    import torch

    from attention_data import make_batch
    from trident.kernels.decode_attention import decode_attention
    from trident.kernels.exit_classifier import exit_classifier
    from trident.kernels.fused_norm import add_rms_norm, rms_norm
    from trident.kernels.prefill_attention import prefill_attention
    from trident.kernels.rope import rope_cos_sin, rope_write_kv
    from trident.kernels.swiglu import swiglu

    if op in ("prefill", "decode"):
        heads = {64: (32, 8), 128: (32, 4), 256: (8, 8)}[size]
        new = [50, 7] if op == "prefill" else [1, 1]
        b = make_batch([129, 7], new, *heads, size, 16, dtype, 0)
        mass = torch.zeros(b.meta.key_slots.shape)
        run = prefill_attention if op == "prefill" else decode_attention
        run(b.q, b.k_cache, b.v_cache, b.meta, 0.1, torch.tensor([0, 5, 3]), mass)
    elif op == "exit":
        hidden, weight = torch.randn(size, 256).to(dtype), torch.ones(256, dtype=dtype)
        exit_classifier(hidden, weight, 1e-6, 0.5, "entropy", probe_weight=weight,
                        lm_head=torch.randn(1000, 256).to(dtype))
    else:
        x = torch.randn(7, 576).to(dtype)
        rms_norm(x, x[0], 1e-6)
        add_rms_norm(x, x, x[0], 1e-6)
        swiglu(x)
        cos, sin = rope_cos_sin(torch.rand(size // 2), 64)
        qkv, cache = torch.randn(7, 9 + 2 * 3, size).to(dtype), torch.randn(7, 3, size).to(dtype)
        rope_write_kv(qkv, 9, cos[:7], sin[:7], cache, cache.clone(), torch.arange(7))
        rope_write_kv(qkv[:, 9:], 0, cos[:7], sin[:7], cache, cache.clone(), torch.arange(7))   # K/V only


def run_case(case: dict) -> list[str]:
    import torch

    if not _COMPILED:
        _compile_only_for_sm90()
        _COMPILED.append(None)            # marks the target as installed
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[case["dtype"]]
    before = len(_COMPILED)
    _launch(case["op"], dtype, case["size"])
    failures = []
    for name, kernel in _COMPILED[before:]:
        if "cubin" not in kernel.asm:
            failures.append(f"{name}: no cubin produced")
        if kernel.metadata.shared > HOPPER_SHARED_BYTES:
            failures.append(f"{name}: {kernel.metadata.shared} bytes of shared memory > {HOPPER_SHARED_BYTES}")
    return failures


@pytest.fixture(scope="module")
def verdicts():
    return run_worker(__file__, interpret=False)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_compiles_for_sm90(case, verdicts):
    check_verdict(verdicts, case["id"])


if __name__ == "__main__":
    worker_main(CASES, run_case, interpret=False)
