"""Build cuda/*.cu for the CPU emulator (emu.h): one shared library per kernel file, with a C entry point per
SIGNATURES kernel, `emu_call_<name>(argv, grid.x, grid.y, grid.z, block.x, block.y, block.z)`.

The sources are compiled unchanged except for two textual swaps: common.cuh's inline-PTX helpers (streaming loads,
cp.async, ldmatrix, mma.sync, wgmma) give way to emu.h's emulations, and the dynamic shared memory declaration points
at the emulator's buffer; OS_EMULATE_SM90 turns on the sm_90a code (gemm_sm90.cu) that other targets compile empty,
and EMU_DEFINES='NAME=VALUE …' adds macros (OS_RING_BULK=0: gemm_quant.cu's pre-sm_90 cp.async ring). EMU_MUTATE='[["old", "new"], …]' applies replacements first (mutation testing: a test suite
that still passes with a kernel broken on purpose is too weak).

    python tests/cuda_emulator/build.py [attention.cu …]   (default: every kernel file)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
CTYPE = {"P": "void*", "i": "int", "f": "float", "q": "long long", "128s": "TensorMap"}  # 128s: a TMA map by value


def build_dir() -> Path:
    """Where the libraries go: $OLMOSCOPE_EMU_BUILD, else a fixed directory under the system temp dir."""
    return Path(os.environ.get("OLMOSCOPE_EMU_BUILD", Path(tempfile.gettempdir()) / "olmoscope-cuda-emulator"))


def emulated_common(source_dir: Path) -> str:
    common = (source_dir / "common.cuh").read_text()
    common = common.replace("#include <cuda_bf16.h>", '#include "emu.h"')
    start, end = common.index("// Streaming 16-byte load"), common.index("// ── reductions")
    common = common[:start] + common[end:]
    start, end = common.index("// ── async copies"), common.index("OS_DEVICE float silu")
    return common[:start] + "OS_EMU_HELPERS\n" + common[end:]


def emulated_source(source_dir: Path, name: str, signatures: dict, mutations: list, codes) -> str:
    text = (source_dir / name).read_text()
    for old, new in mutations:
        if old in text:
            text = text.replace(old, new, 1)
            print(f"mutated {name}: {old[:70]!r}", file=sys.stderr)
    text = text.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                        "unsigned char* smem_raw = emu_dynamic_smem;")
    text += "\n// ── emulator entry points ──\n"
    for kernel, (file, fmt) in signatures.items():
        if file != name:
            continue
        types = [CTYPE[c] for c in codes(fmt)]
        unpack = "; ".join(f"{t} p{i} = *({t}*)a[{i}]" for i, t in enumerate(types))
        call = ", ".join(f"p{i}" for i in range(len(types)))
        text += (f'extern "C" void emu_call_{kernel}(void* const* a, unsigned gx, unsigned gy, unsigned gz, '
                 f"unsigned bx, unsigned by, unsigned bz) {{\n"
                 f"    auto f = reinterpret_cast<void (*)({', '.join(types)})>(&{kernel});\n"
                 f"    {unpack};\n"
                 f"    emu_launch([=] {{ f({call}); }}, {{gx, gy, gz}}, {{bx, by, bz}});\n}}\n")
    return text


def build(names: list[str] | None = None) -> Path:
    """Compile the kernel files (all by default) into build_dir(); returns it. Raises RuntimeError on a failure."""
    from olmoscope.runtime.cuda.build import KERNEL_FILES, kernel_dir
    from olmoscope.runtime.cuda.kernels import SIGNATURES, argument_codes

    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++ 12 or newer, C++20) for the CUDA emulator")
    source_dir, out = kernel_dir(), build_dir()
    out.mkdir(parents=True, exist_ok=True)
    (out / "common.cuh").write_text(emulated_common(source_dir))
    mutations = json.loads(os.environ.get("EMU_MUTATE", "[]"))
    defines = [f"-D{d}" for d in os.environ.get("EMU_DEFINES", "").split()]  # e.g. OS_RING_BULK=0

    def one(name: str) -> str:
        cpp = out / f"{name}.cpp"
        cpp.write_text(emulated_source(source_dir, name, SIGNATURES, mutations, argument_codes))
        command = [compiler, "-std=c++20", "-O1", "-fPIC", "-shared", "-w", "-DOS_EMULATE_SM90", *defines, "-I", str(out),
                   "-I", str(HERE),
                   "-x", "c++", str(cpp), "-o", str(out / f"{name}.so")]
        result = subprocess.run(command, capture_output=True, text=True)
        return "" if result.returncode == 0 else f"{name}:\n{result.stderr[:4000]}"

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        failures = [f for f in pool.map(one, names or list(KERNEL_FILES)) if f]
    if failures:
        raise RuntimeError("the CUDA emulator build failed:\n" + "\n".join(failures))
    return out


if __name__ == "__main__":
    print(build(sys.argv[1:] or None))
