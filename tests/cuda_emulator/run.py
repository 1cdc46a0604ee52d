"""Build the kernels for the CPU emulator, then run tests/test_cuda_kernels.py and tests/test_cuda_quant_kernels.py
on it; arguments go to pytest.

    python tests/cuda_emulator/run.py -q -k "paged_decode"      (the whole file: about 4 minutes on 2 cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # as pytest has it: tests/ modules import by their own names

from cuda_emulator.build import build  # noqa: E402

if __name__ == "__main__":
    build()
    import pytest

    sys.exit(pytest.main(["-p", "cuda_emulator.plugin", str(ROOT / "tests" / "test_cuda_kernels.py"),
                          str(ROOT / "tests" / "test_cuda_quant_kernels.py"), *sys.argv[1:]]))
