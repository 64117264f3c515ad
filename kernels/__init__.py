"""Trident kernels: one file per op, each with a Triton kernel, a checked launcher and a torch `_ref` twin.

`engine/` imports from here; this package never imports `engine/`.
"""
