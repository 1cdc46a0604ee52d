"""Every kernel file builds with nvcc for sm_80 and sm_90 (CI has nvcc but no GPU); a broken kernel is reported
with its file and line. Skipped, and said so, only where nvcc is absent."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda.build import (ARCH_FILES, KERNEL_FILES, arch_flag, build_arch, compile_kernel,
                                         describe_failure, kernel_dir)

NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels were NOT compiled")


def test_every_kernel_file_is_listed():
    on_disk = {p.name for p in kernel_dir().glob("*.cu")}
    assert on_disk == set(KERNEL_FILES), f"cuda/ holds {sorted(on_disk)}, the build lists {sorted(KERNEL_FILES)}"


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_builds(name, arch, tmp_path):
    cubin = compile_kernel(name, arch, cache=tmp_path)
    assert cubin.is_file() and cubin.stat().st_size > 0, f"{name} for {arch}: no cubin"


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize("name,arch", [(name, target) for name, targets in ARCH_FILES.items()
                                       for target in targets.values()])
def test_architecture_specific_files_build_for_their_target(name, arch, tmp_path):
    cubin = compile_kernel(name, arch, cache=tmp_path)
    assert cubin.is_file() and cubin.stat().st_size > 0, f"{name} for {arch}: no cubin"


def test_architecture_specific_targets_use_gencode():
    assert arch_flag("sm_90") == "-arch=sm_90"
    assert arch_flag("sm_90a") == "-gencode=arch=compute_90a,code=sm_90a"
    assert build_arch("gemm_sm90.cu", "sm_90") == "sm_90a" and build_arch("gemm_sm90.cu", "sm_80") == "sm_80"
    assert build_arch("gemm.cu", "sm_90") == "sm_90"


@needs_nvcc
def test_build_is_cached_by_source_and_arch(tmp_path):
    first = compile_kernel("norms.cu", "sm_90", cache=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = compile_kernel("norms.cu", "sm_90", cache=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp, "second build did not come from the cache"
    other = compile_kernel("norms.cu", "sm_80", cache=tmp_path)
    assert other != first


@needs_nvcc
def test_broken_kernel_reports_file_and_line(tmp_path):
    source_dir = tmp_path / "src"
    source_dir.mkdir()
    shutil.copy(kernel_dir() / "common.cuh", source_dir)
    (source_dir / "broken.cu").write_text('#include "common.cuh"\n\nextern "C" __global__ void k(float* x) {\n'
                                          "    x[0] = undefined_name;\n}\n")
    with pytest.raises(DeviceError) as info:
        compile_kernel("broken.cu", "sm_90", source_dir=source_dir, cache=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith("cuda/broken.cu:4: error:") and "undefined_name" in message, message


def test_failure_text_without_a_diagnostic_line_still_names_the_file():
    line = describe_failure("nvcc fatal   : Unsupported gpu architecture 'sm_1'", Path("cuda/gemm.cu"), "sm_1")
    assert line.startswith("cuda/gemm.cu: nvcc failed for sm_1: nvcc fatal"), line


@needs_nvcc
@pytest.mark.slow
def test_the_wgmma_entries_are_built_with_their_wgmma_for_sm_90a(tmp_path):
    """gemm_sm90.cu's kernels compile empty for other targets: for compute_90a each entry must hold its
    wgmma.mma_async, its waits and its cp.async copies (a wrong #if would leave a stub that writes nothing)."""
    import re
    import subprocess

    from olmoscope.runtime.cuda.kernels import GEMM90_TILES, SIGNATURES

    ptx = tmp_path / "gemm_sm90.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=compute_90a", "-ptx", "-o", str(ptx), str(kernel_dir() / "gemm_sm90.cu")],
                   check=True, capture_output=True)
    text = ptx.read_text()
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)(?=\.entry |\Z)", text, re.S))
    names = {name for name, (file, _) in SIGNATURES.items() if file == "gemm_sm90.cu"}
    assert names == {f"gemm90_bf16{silu}_bm{bm}" for bm in GEMM90_TILES for silu in ("", "_silu")}
    for name in names:
        body = bodies[name]
        assert body.count("wgmma.mma_async.sync.aligned.m64n256k16") == 4, f"{name}: not the 4 k16 steps per k-tile"
        assert "wgmma.wait_group" in body and "cp.async.cg.shared.global" in body and "fence.proxy.async" in body, name


@needs_nvcc
@pytest.mark.slow
def test_the_wgmma_prefill_attention_is_built_with_its_wgmma_for_sm_90a(tmp_path):
    """attention_sm90.cu's entries, for compute_90a: S = Q·Kᵀ as d/16 m64n128k16 steps, P·V as 8 k16 steps (N = d)
    wherever a tile's P·V is issued, their waits and the cp.async copies (not the empty stubs of other targets)."""
    import re
    import subprocess

    from olmoscope.runtime.cuda.kernels import HEAD_DIMS_SM90, SIGNATURES

    ptx = tmp_path / "attention_sm90.ptx"
    subprocess.run([NVCC, "-std=c++17", "-arch=compute_90a", "-ptx", "-o", str(ptx),
                    str(kernel_dir() / "attention_sm90.cu")], check=True, capture_output=True)
    bodies = dict(re.findall(r"\.entry (\w+)\((.*?)(?=\.entry |\Z)", ptx.read_text(), re.S))
    names = {name for name, (file, _) in SIGNATURES.items() if file == "attention_sm90.cu"}
    assert names == {f"paged_prefill90_d{d}" for d in HEAD_DIMS_SM90}
    for d in HEAD_DIMS_SM90:
        body = bodies[f"paged_prefill90_d{d}"]
        mmas = re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m64n\d+k16)[^;]*?\}\s*,\s*(\{?)", body, re.S)
        s_steps = sum(1 for shape, registers in mmas if shape == "m64n128k16" and not registers)  # A: a descriptor
        pv_steps = sum(1 for shape, registers in mmas if shape == f"m64n{d}k16" and registers)   # A: registers
        assert s_steps == d // 16 and pv_steps > 0 and pv_steps % 8 == 0 and len(mmas) == s_steps + pv_steps, (
            d, s_steps, pv_steps, len(mmas))
        assert "wgmma.wait_group" in body and "cp.async.cg.shared.global" in body and "fence.proxy.async" in body, d
