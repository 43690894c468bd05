"""Triton kernels, installed as the subpackage ``dpseg.kernels`` (one file per op)."""
