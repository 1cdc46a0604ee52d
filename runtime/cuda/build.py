"""Building the CUDA kernels: nvcc compiles each cuda/*.cu file for the GPU's architecture at first use, and
the cubin is cached on disk, keyed by the sources, the architecture, the nvcc version and the flags.

A kernel that does not build is a DeviceError naming the kernel file and line (`cuda/gemm.cu:42: error: …`).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from olmoscope.errors import DeviceError

# One file per kernel family; common.cuh is included by all of them.
KERNEL_FILES = ("embedding.cu", "norms.cu", "rope.cu", "gemv.cu", "gemm.cu", "gemm_quant.cu", "gemm_v1.cu", "gemm_sm90.cu",
                "gemm_sm90_tma.cu", "attention.cu", "attention_sm90.cu", "sampling.cu", "kv_cache.cu")
# Files with code for one architecture's own features: built for that target ("sm_90a": wgmma) on that GPU; for any
# other target their kernels compile empty (and are never launched there).
ARCH_FILES = {"gemm_sm90.cu": {"sm_90": "sm_90a"}, "gemm_sm90_tma.cu": {"sm_90": "sm_90a"},
              "attention_sm90.cu": {"sm_90": "sm_90a"}}
NVCC_FLAGS = ("-O3", "-std=c++17", "-lineinfo", "-Xptxas=-warn-spills")  # no fast math: RoPE needs exact sincosf
_NVCC_DIAGNOSTIC = re.compile(r"^(?P<file>[^\s(]+)\((?P<line>\d+)\): (?P<kind>error|catastrophic error)\b:?\s*(?P<text>.*)$")


def kernel_dir() -> Path:
    """Where the .cu sources live (the installed `olmoscope.kernels` package, i.e. cuda/ in the repo)."""
    return Path(str(resources.files("olmoscope.kernels")))


def find_nvcc() -> str | None:
    """nvcc from PATH, else from $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc: str) -> str:
    """The release line of `nvcc --version` (part of the cache key)."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DeviceError(f"{nvcc}: cannot run nvcc ({exc})") from None
    lines = [line for line in out.splitlines() if "release" in line]
    return lines[-1].strip() if lines else out.strip()


def cache_dir() -> Path:
    """$OLMOSCOPE_CACHE/kernels, else $XDG_CACHE_HOME/olmoscope/kernels, else ~/.cache/olmoscope/kernels."""
    if os.environ.get("OLMOSCOPE_CACHE"):
        return Path(os.environ["OLMOSCOPE_CACHE"]) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "olmoscope" / "kernels"


def sources_digest(directory: Path) -> str:
    """sha256 over every .cu and .cuh file of the kernel directory (headers change every kernel)."""
    digest = hashlib.sha256()
    for path in sorted(list(directory.glob("*.cu")) + list(directory.glob("*.cuh"))):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def arch_flag(arch: str) -> str:
    """nvcc's target option for `arch`: -arch=sm_90, or for an architecture-specific target (sm_90a) the -gencode
    form (the -arch=sm_90a shorthand also runs a plain sm_90 pass that rejects wgmma)."""
    if arch.endswith("a"):
        number = arch[len("sm_"):-1]
        return f"-gencode=arch=compute_{number}a,code=sm_{number}a"
    return f"-arch={arch}"


def build_arch(name: str, arch: str) -> str:
    """The target a kernel file is built for on a GPU of `arch`: its ARCH_FILES target there, else `arch`."""
    return ARCH_FILES.get(name, {}).get(arch, arch)


def nvcc_command(nvcc: str, source: Path, arch: str, output: Path) -> list[str]:
    """The nvcc invocation that builds one kernel file into a cubin for `arch` (e.g. "sm_90", "sm_90a")."""
    return [nvcc, *NVCC_FLAGS, arch_flag(arch), "-cubin", "-o", str(output), str(source)]


def compile_kernel(name: str, arch: str, *, source_dir: Path | None = None, cache: Path | None = None,
                   nvcc: str | None = None) -> Path:
    """Build cuda/<name> for `arch` unless the cache already holds it; the cubin's path.

    >>> compile_kernel("gemm.cu", "sm_90").suffix
    '.cubin'
    """
    source_dir = source_dir or kernel_dir()
    source = source_dir / name
    if not source.is_file():
        raise DeviceError(f"{source}: kernel source missing (is the package installed with its cuda/ data?)")
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise DeviceError("nvcc not found (PATH, $CUDA_HOME): the CUDA backend compiles its kernels at first use")
    cache = cache or cache_dir()
    key = hashlib.sha256(
        "\0".join((sources_digest(source_dir), name, arch, nvcc_version(nvcc), *NVCC_FLAGS)).encode()
    ).hexdigest()[:24]
    target = cache / f"{Path(name).stem}-{arch}-{key}.cubin"
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run(nvcc_command(nvcc, source, arch, built), capture_output=True, text=True)
            if result.returncode != 0:
                raise DeviceError(describe_failure(result.stderr + result.stdout, source, arch))
            os.replace(built, target)  # atomic: a concurrent build of the same key writes the same bytes
    except OSError as exc:
        raise DeviceError(f"{cache}: cannot write the kernel cache ({exc.strerror or exc})") from None
    return target


def describe_failure(output: str, source: Path, arch: str) -> str:
    """One line for a failed build: the first error as `cuda/<file>:<line>: error: <text>`."""
    for line in output.splitlines():
        match = _NVCC_DIAGNOSTIC.match(line.strip())
        if match:
            where = Path(match["file"])
            shown = f"cuda/{where.name}" if where.suffix in (".cu", ".cuh") else str(where)
            return f"{shown}:{match['line']}: {match['kind']}: {match['text']} (nvcc for {arch})"
    first = next((line.strip() for line in output.splitlines() if line.strip()), "no output")
    return f"cuda/{source.name}: nvcc failed for {arch}: {first}"


def arch_of(compute_capability: tuple[int, int]) -> str:
    """(9, 0) → "sm_90"."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"
