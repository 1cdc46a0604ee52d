"""A CPU emulator for olmoscope's CUDA kernels (emu.h), so their GPU tests also run where there is no GPU."""
