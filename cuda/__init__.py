"""CUDA kernel sources (.cu), one file per family; shipped as package data and compiled at first use."""
