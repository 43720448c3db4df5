"""Triton kernels, each importable alone and each with a plain-torch reference.

The CUDA fast path fills this package; the torch reference backend in `server.layers`
is what runs on the CPU.
"""
