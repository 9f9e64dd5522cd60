"""Triton device code of fastrev, installed as ``fastrev.kernels`` (setuptools ``package-dir``).

Import is lazy from the host side: the kernels are JIT-compiled on first launch. Set ``TRITON_INTERPRET=1`` before
importing to run them on CPU tensors with Triton's interpreter.
"""
