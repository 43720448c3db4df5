"""Triton kernels, each importable alone and each with a plain-torch reference.

Every module here has a `*_reference` function in plain torch that states the math (and is
what the CPU path runs), and the Triton kernel that the CUDA path runs. Tests compare the two
on the GPU and, with `TRITON_INTERPRET=1`, on the CPU.
"""
