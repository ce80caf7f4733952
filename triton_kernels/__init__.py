"""Triton kernels of fusedops, installed as ``fusedops.triton_kernels``.

One module per op family: ``@triton.jit`` kernels plus thin launch functions that take
tensors. They know nothing of autograd, argument checking or backend selection (that is
``fusedops.ops`` and ``fusedops.dispatch``). Importing this package imports nothing heavy;
import a kernel module only after ``TRITON_INTERPRET`` has been decided.
"""
