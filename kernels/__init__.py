"""Trident kernels: one file per op, each with a Triton kernel, a checked launcher and a torch `_ref` twin
(linear.py, the model's projections, is torch only: a CPU GEMM-form dispatch).

`engine/` imports from here; this package never imports `engine/`.
"""
