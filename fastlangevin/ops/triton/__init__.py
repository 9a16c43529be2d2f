"""Triton kernels of fastlangevin (one module per op). Import the modules directly; this package imports nothing, so
that ``import fastlangevin`` never pulls in Triton."""
