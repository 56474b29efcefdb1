"""Triton kernels of modelbatch (installed as ``modelbatch.kernels``).

One module per op (``kernels/<op>.py``), each taking the op's arguments with an
explicit leading model axis. They run on CUDA tensors, and on CPU tensors under
``TRITON_INTERPRET=1`` (how CI, which has no GPU, tests their logic).
"""
