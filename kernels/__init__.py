"""Triton kernels (importable only as fastdebias.kernels): @triton.jit functions and their configs."""
