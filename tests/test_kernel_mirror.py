"""The Python side of the kernels mirrors the CUDA side: a mismatch fails here (CPU, nvcc only) instead of corrupting
device memory on a GPU.

- Every SIGNATURES entry is an `.entry` of its file's PTX whose parameter sizes match its PyCUDA format (P and q:
  8 bytes, i and f: 4, 128s: a 128-byte struct by value, a TMA tensor map), and every kernel entry of every file
  is in SIGNATURES.
- Every mirrored constant in kernels.py equals its `constexpr int` in the .cu/.cuh sources.
- The host-side planners (gemm_plan, gemm_stream_tile, gemm_workspace, decode_splits, prefill_tiles, decode_group)
  keep their promises, and their docstring examples hold.

The PTX checks need nvcc (skipped, and said so, where it is absent); the planner checks run everywhere.
"""

from __future__ import annotations

import math
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda import kernels
from olmoscope.runtime.cuda.build import KERNEL_FILES, find_nvcc, kernel_dir

NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the kernels' PTX was NOT checked against Python")

PARAM_BYTES = {"P": 8, "q": 8, "i": 4, "f": 4}
PTX_TYPE_BYTES = {"u64": 8, "b64": 8, "s64": 8, "f64": 8, "u32": 4, "b32": 4, "s32": 4, "f32": 4}
_ENTRY = re.compile(r"\.(?:visible\s+)?\.entry\s+(\w+)\s*\((.*?)\)", re.S)
_PARAM = re.compile(r"\.param\s+(?:\.align\s+\d+\s+)?\.(\w+)\s+\w+(\[\d+\])?")
_CONSTEXPR = re.compile(r"constexpr\s+int\s+([^;]+);")


def ptx_entries(ptx: str) -> dict[str, list[int]]:
    """kernel name → the byte size of each parameter, from the PTX text."""
    entries = {}
    for name, params in _ENTRY.findall(ptx):
        sizes = []
        for kind, array in _PARAM.findall(params):
            if array and kind == "b8":  # a struct by value (a TMA tensor map: format "128s")
                sizes.append(int(array[1:-1]))
                continue
            if array or kind not in PTX_TYPE_BYTES:
                raise AssertionError(f"{name}: a by-value struct or array parameter ({kind}{array}) cannot be mirrored")
            sizes.append(PTX_TYPE_BYTES[kind])
        entries[name] = sizes
    return entries


def constexprs(text: str) -> dict[str, int]:
    """Every `constexpr int NAME = <integer>` (comma lists too) in a source text."""
    found = {}
    for declarators in _CONSTEXPR.findall(text):
        for declarator in declarators.split(","):
            match = re.fullmatch(r"\s*(\w+)\s*=\s*(-?\d+)\s*", declarator)
            if match:
                found[match[1]] = int(match[2])
    return found


@pytest.fixture(scope="session")
def ptx(tmp_path_factory) -> dict[str, str]:
    """file → its PTX for sm_80 (what every supported GPU runs), compiled once per session, files in parallel."""
    out = tmp_path_factory.mktemp("ptx")

    def build(name: str) -> str:
        target = out / f"{name}.ptx"
        # -Xcicc -O0: the entries and their parameters do not depend on optimisation, and it is 4× faster
        command = [NVCC, "-std=c++17", "-arch=sm_80", "-ptx", "-Xcicc", "-O0", "-o", str(target), str(kernel_dir() / name)]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: nvcc -ptx failed:\n{result.stderr}"
        return target.read_text()

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(KERNEL_FILES, pool.map(build, KERNEL_FILES)))


@needs_nvcc
def test_every_signature_is_an_entry_with_matching_parameter_sizes(ptx):
    entries = {file: ptx_entries(text) for file, text in ptx.items()}
    problems = []
    for name, (file, argtypes) in kernels.SIGNATURES.items():
        if file not in entries:
            problems.append(f"{name}: file {file} is not in KERNEL_FILES")
        elif name not in entries[file]:
            problems.append(f"{name}: no .entry in {file}")
        else:
            want = [int(c[:-1]) if c.endswith("s") else PARAM_BYTES[c] for c in kernels.argument_codes(argtypes)]
            if entries[file][name] != want:
                problems.append(f"{name}: PTX parameters {entries[file][name]} bytes, SIGNATURES '{argtypes}' = {want}")
    assert not problems, "\n".join(problems)


@needs_nvcc
def test_every_kernel_in_the_sources_is_in_signatures(ptx):
    unlisted = [f"{file}: {name}" for file, text in ptx.items() for name in ptx_entries(text)
                if kernels.SIGNATURES.get(name, (None,))[0] != file]
    assert not unlisted, "kernels without a SIGNATURES entry (or listed under another file):\n" + "\n".join(unlisted)


def kernel_openings(text: str) -> list[tuple[str, list[str], str]]:
    """(kernel name, the statements of its body up to and with the first grid_dependency_sync() or
    grid_dependents_launch() — or only the first statement when none of the first eight is one — and its parameter
    list) for every __global__ function in a source text."""
    found = []
    openers = ("grid_dependency_sync();", "grid_dependents_launch();")
    for match in re.finditer(r"__global__", text):
        head_end = text.index("{", match.end())
        head = text[match.end():head_end].replace("\\\n", " ")
        last = list(re.finditer(r"(\w+(?:##\w+)*)\s*\(", head))[-1]
        name, params = last.group(1), " ".join(head[last.end() - 1:].split())
        body = text[head_end + 1:].replace("\\\n", " ")
        statements = [" ".join(part.split()) + ";" for part in body.split(";", 8)[:8]]
        until = next((i for i, st in enumerate(statements) if st in openers), 0)
        found.append((name, statements[:until + 1], params))
    return found


def test_every_kernel_waits_for_its_predecessor_first():
    """Graph edges may be programmatic (driver.py CudaGraph, OLMOSCOPE_PDL): a kernel that reads or writes anything
    before grid_dependency_sync() (common.cuh), or returns without it, races the kernel before it. The one exception:
    a projection may trigger first (grid_dependents_launch), or later (the decode projections, after their main loop:
    the kernel is one call of its *_body), and copy its first weights before its grid_dependency_wait(), which its
    file must then call, when those weights are never written on the device: a kernel that takes `int w_early`, which
    the launcher sets only for the model's weights (Kernels.gemm static_weights), or one that reads the engine's
    packed quantized `qweight`."""
    late = []
    for path in sorted(kernel_dir().glob("*.cu")):
        text = path.read_text()
        for name, opening, params in kernel_openings(text):
            static = "int w_early" in params or "qweight" in params
            early = static and (opening == ["grid_dependents_launch();"] or re.match(r"\w+_body(_v1)?<", opening[0]))
            if early and "grid_dependency_wait();" not in text:
                late.append(f"{path.name}: {name}: triggers early, and its file never calls grid_dependency_wait()")
            elif opening != ["grid_dependency_sync();"] and not early:
                late.append(f"{path.name}: {name}: {opening}")
    assert not late, "kernels that do not start with grid_dependency_sync():\n" + "\n".join(late)


def test_the_kernel_opening_parser_sees_a_late_wait():
    text = ('extern "C" __global__ void __launch_bounds__(128) a(int* x) {\n    grid_dependency_sync();\n    x[0] = 1;\n}\n'
            '#define K(N) extern "C" __global__ void b##N(int* x) { \\\n    if (x[0]) return; \\\n'
            '    grid_dependency_sync(); \\\n}\n')
    assert kernel_openings(text) == [("a", ["grid_dependency_sync();"], "(int* x)"),
                                     ("b##N", ["if (x[0]) return;", "grid_dependency_sync();"], "(int* x)")]
    assert kernel_openings('__global__ void c(int* x) { x[0] = 1; }') == [("c", ["x[0] = 1;"], "(int* x)")]
    assert kernel_openings('__global__ void d(int* w, int w_early) { grid_dependents_launch(); }') == [
        ("d", ["grid_dependents_launch();"], "(int* w, int w_early)")]


def test_every_mirrored_constant_matches_its_constexpr():
    sources = {path.name: path.read_text() for path in kernel_dir().iterdir() if path.suffix in (".cu", ".cuh")}
    values = {name: constexprs(text) for name, text in sources.items()}
    problems = []
    for python_name, (file, cuda_name) in kernels.MIRRORED.items():
        mine = getattr(kernels, python_name)
        theirs = values.get(file, {}).get(cuda_name)
        if theirs is None:
            problems.append(f"{python_name}: no `constexpr int {cuda_name}` in {file}")
        elif theirs != mine:
            problems.append(f"{python_name} = {mine} in kernels.py, {cuda_name} = {theirs} in {file}")
    assert not problems, "\n".join(problems)


def test_the_constexpr_parser_reads_comma_lists_and_refuses_expressions():
    found = constexprs("constexpr int A = 64, B = 2; constexpr int C = A * 2; constexpr float F = 1;")
    assert found == {"A": 64, "B": 2}


def test_the_ptx_parser_reads_parameter_sizes():
    text = ".visible .entry k(\n\t.param .u64 k_param_0,\n\t.param .u32 k_param_1,\n\t.param .f32 k_param_2\n)"
    assert ptx_entries(text) == {"k": [8, 4, 4]}


def test_every_kernel_family_has_its_instantiations():
    names = set(kernels.SIGNATURES)
    for d in kernels.HEAD_DIMS:
        assert f"paged_prefill_d{d}" in names
        for g in kernels.DECODE_GROUPS:
            assert f"paged_decode_d{d}_g{g}" in names
    for d in kernels.HEAD_DIMS_SM90:
        assert d in kernels.HEAD_DIMS and f"paged_prefill90_d{d}" in names
    for m in range(1, kernels.GEMV_MAX_ROWS + 1):
        for variant in ("bf16", "int8", "bf16_silu", "int8_silu"):
            assert f"gemv_{variant}_m{m}" in names
    for bm in kernels.GEMM_TILES:
        assert f"gemm_bf16_bm{bm}" in names and f"gemm_bf16_silu_bm{bm}" in names
    for bm in kernels.GEMM_V1_TILES:
        assert f"gemm_v1_bf16_bm{bm}" in names and f"gemm_v1_bf16_silu_bm{bm}" in names


# ── host-side planners ────────────────────────────────────────────────────────────────────────────────
SHAPES = [(12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008), (6144, 2048), (2048, 2048), (16384, 2048),
          (2048, 8192), (1001, 776)]


@pytest.mark.parametrize("M", [1, 5, 16, 17, 33, 64, 100, 256, 300, 2048])
@pytest.mark.parametrize("N,K", SHAPES)
def test_gemm_stream_tile_streams_every_shape_over_the_whole_chip(M, N, K):
    sm = 132
    bm = kernels.gemm_stream_tile(M, N, K, sm)
    assert bm in kernels.GEMM_TILES and bm <= 2 * max(M, 16)
    if bm != kernels.gemm_tile(M):  # the model's choice over gemm_tile's must be clearly cheaper
        assert kernels.gemm_cost(bm, M, N, K, sm) < kernels.GEMM_MODEL_MARGIN * kernels.gemm_cost(
            kernels.gemm_tile(M), M, N, K, sm)
    tile = kernels.GEMM_TILES[bm]
    tiles, kt = math.ceil(M / bm) * math.ceil(N / tile.bn), math.ceil(K / tile.bk)
    ctas, sk_tiles = kernels.gemm_stream_plan(tiles, kt, sm)
    assert 1 <= ctas <= sm and 0 <= sk_tiles <= tiles
    assert sk_tiles == 0 or sk_tiles * kt >= ctas, "a CTA with an empty stream-K chunk would never take its ticket"
    work = kernels.gemm_stream_chunks(tiles, kt, ctas, sk_tiles)
    done = set()
    for segments in work:
        for tile_index, k0, count in segments:
            for k in range(k0, k0 + count):
                assert (tile_index, k) not in done, "a k-tile computed twice"
                done.add((tile_index, k))
    assert len(done) == tiles * kt, "a k-tile left out"
    loads = [sum(count for _, _, count in segments) for segments in work]
    assert max(loads) - min(loads) <= 1, "CTAs with more than one k-tile more work than others: a partial wave"
    assert all(sum(1 for s in segments if s[2] != kt) <= 2 for segments in work), "more than 2 cut tiles in a CTA"
    first_ctas = {}  # a cut tile's ticket is its first CTA's: no two cut tiles may share one
    for b, segments in enumerate(work):
        for tile_index, k0, count in segments:
            if count != kt:
                first_ctas.setdefault(tile_index, b)
    assert len(set(first_ctas.values())) == len(first_ctas)


# The plan by measurement (H200, 2026-12-02, benchmarks/bench_kernels.py): (model, projection, N, K, silu, M) → the
# variant that was fastest there, or within 5 % of it. Every projection row of that run is in the doctests or here.
MEASURED_WINNERS = [
    ("1b", "qkv", 6144, 2048, False, 8, "v1"), ("1b", "o_proj", 2048, 2048, False, 8, "v1"),
    ("1b", "down", 2048, 8192, False, 8, "v1"), ("1b", "o_proj", 2048, 2048, False, 2, "v1"),
    ("1b", "gate_up", 16384, 2048, True, 2, "gemv"), ("1b", "gate_up", 16384, 2048, True, 4, "v1"),
    ("1b", "qkv", 6144, 2048, False, 128, "v1"), ("1b", "qkv", 6144, 2048, False, 256, "sm90"),
    ("1b", "gate_up", 16384, 2048, True, 64, "v1"), ("1b", "gate_up", 16384, 2048, True, 128, "sm90"),
    ("1b", "down", 2048, 8192, False, 256, "v1"), ("1b", "down", 2048, 8192, False, 512, "stream"),
    ("7b", "qkv", 12288, 4096, False, 64, "v1"), ("7b", "qkv", 12288, 4096, False, 128, "sm90"),
    ("7b", "o_proj", 4096, 4096, False, 64, "v1"), ("7b", "o_proj", 4096, 4096, False, 256, "v1"),
    ("7b", "gate_up", 22016, 4096, True, 16, "v1"), ("7b", "gate_up", 22016, 4096, True, 64, "sm90"),
    ("7b", "down", 4096, 11008, False, 4, "v1"), ("7b", "down", 4096, 11008, False, 1, "gemv"),
    ("7b", "down", 4096, 11008, False, 64, "v1"), ("7b", "down", 4096, 11008, False, 256, "v1"),
    ("7b", "o_proj", 4096, 4096, False, 512, "sm90"), ("7b", "down", 4096, 11008, False, 2048, "sm90"),
]


@pytest.mark.parametrize("model,name,N,K,silu,M,winner", MEASURED_WINNERS)
def test_gemm_plan_picks_what_the_h200_measured_fastest(model, name, N, K, silu, M, winner):
    plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=True, skinny=False)  # the measured plan
    assert plan.variant == winner, f"{model} {name} M = {M}: {plan}, measured fastest: {winner}"
    if winner == "v1":
        assert (plan.bm, plan.splits) == kernels.gemm_v1_plan(M, N, K, 132, silu=silu), "v1 as it was measured"


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 16, 33, 64, 100, 128, 256, 257, 300, 512, 2048])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("hopper,skinny", [(False, True), (True, False), (True, True)])
def test_gemm_plan_is_launchable_and_the_same_on_every_call(M, N, K, hopper, skinny):
    for silu in (False, True):
        plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=hopper, skinny=skinny)
        assert plan == kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=hopper, skinny=skinny)
        assert plan.variant in ("gemv", *kernels.GEMM_VARIANTS) and plan.splits >= 1
        if plan.variant == "gemv":
            assert M <= kernels.GEMV_MAX_ROWS and plan.splits == 1
        elif plan.variant == "sm90":
            assert hopper and plan.bm in kernels.GEMM90_TILES
            if plan.splits > 1:
                assert skinny
                check_gemm90_splits(plan.bm, M, N, K, plan.splits)
        elif plan.variant == "v1":
            assert plan.bm in kernels.GEMM_V1_TILES and M <= kernels.GEMM_V1_MAX_ROWS
            assert plan.splits == 1 or not silu, "v1's SiLU is fused, one split"
        else:
            assert plan.bm in kernels.GEMM_TILES and plan.splits == 1
        if not hopper:
            assert plan.variant != "sm90"
    for M_int8 in range(1, kernels.GEMV_MAX_ROWS + 1):  # int8 weights: the GEMV reads them as they are
        assert kernels.gemm_plan(M_int8, N, K, 132, int8=True).variant == "gemv"


@pytest.mark.parametrize("M", [1, 8, 17, 40, 64, 100, 128, 256, 512, 2048])
@pytest.mark.parametrize("N,K", SHAPES)
def test_gemm_plan_with_tma_moves_only_wgmma_regimes_to_the_tma_kernels(M, N, K):
    for silu in (False, True):
        for skinny in (False, True):
            base = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=True, skinny=skinny)
            plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=True, skinny=skinny, tma=True)
            assert base.variant != "tma", "the TMA kernels only where tma says they are available"
            if base.variant == "sm90":
                assert plan.variant in ("sm90", "tma") and plan._replace(variant="sm90") == base, (base, plan)
                assert plan.bm in kernels.GEMM90T_TILES
            else:
                assert plan == base, "a regime without wgmma keeps its kernel"
            assert kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=False, skinny=skinny, tma=True).variant not in (
                "sm90", "tma")


def check_gemm90_splits(bm, M, N, K, splits, sm=132):
    """gemm90_splits' promises: one resident wave, no empty split, long enough shares, bounded partial traffic."""
    tiles = math.ceil(M / bm) * math.ceil(N / kernels.GEMM90_BN)
    ktiles = math.ceil(K / kernels.GEMM90_BK)
    per_split = math.ceil(ktiles / splits)
    assert tiles * splits <= sm, "more CTAs than multiprocessors: a second wave"
    assert (splits - 1) * per_split < ktiles, "an empty split"
    assert per_split >= kernels.GEMM90_MIN_KTILES_PER_SPLIT
    assert 8 * splits * M * N <= N * K, "partials cost more than half the weights' traffic"
    assert tiles * splits >= kernels.GEMM90_SKINNY_MIN_CTAS


@pytest.mark.parametrize("M", range(17, 257, 7))
@pytest.mark.parametrize("N,K", SHAPES)
def test_skinny_plan_streams_with_one_wave_of_wgmma_ctas(M, N, K):
    for silu in (False, True):
        plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=True)
        if plan.variant != "sm90" or plan.splits == 1:
            continue
        assert plan.bm == kernels.gemm90_tile(M)
        check_gemm90_splits(plan.bm, M, N, K, plan.splits)
        if silu:
            assert math.ceil(M / plan.bm) * math.ceil(N / kernels.GEMM90_BN) < kernels.GEMM90_FUSED_SILU_CTAS


def test_skinny_plan_at_the_7b_decode_batch_of_64():
    plans = {name: kernels.gemm_plan(64, N, K, 132, silu=name == "gate_up", hopper=True)
             for name, (N, K) in {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096),
                                  "down": (4096, 11008)}.items()}
    assert plans == {"qkv": ("sm90", 64, 2), "o_proj": ("sm90", 64, 8), "gate_up": ("sm90", 64, 1),
                     "down": ("sm90", 64, 8)}
    assert kernels.gemm_plan(64, 4096, 4096, 132, hopper=True, skinny=False).variant == "v1"  # still reachable


# The TMA kernels against the cp.async ones on the same plan (H200, 2026-12-02, bench_kernels.py columns sm90k/tmak and
# sm90/tma): (model, projection, N, K, silu, M) → the faster of the two.
MEASURED_TMA_WINNERS = [
    ("7b", "qkv", 12288, 4096, False, 32, "tma"), ("7b", "qkv", 12288, 4096, False, 64, "tma"),
    ("7b", "o_proj", 4096, 4096, False, 32, "sm90"), ("7b", "o_proj", 4096, 4096, False, 64, "sm90"),
    ("7b", "o_proj", 4096, 4096, False, 128, "tma"), ("7b", "o_proj", 4096, 4096, False, 256, "tma"),
    ("7b", "gate_up", 22016, 4096, True, 64, "tma"), ("7b", "gate_up", 22016, 4096, True, 128, "tma"),
    ("7b", "down", 4096, 11008, False, 32, "tma"), ("7b", "down", 4096, 11008, False, 64, "tma"),
    ("7b", "down", 4096, 11008, False, 256, "tma"), ("7b", "down", 4096, 11008, False, 2048, "tma"),
    ("7b", "gate_up", 22016, 4096, True, 2048, "tma"), ("7b", "o_proj", 4096, 4096, False, 512, "tma"),
    ("1b", "qkv", 6144, 2048, False, 32, "sm90"), ("1b", "qkv", 6144, 2048, False, 64, "sm90"),
    ("1b", "down", 2048, 8192, False, 32, "sm90"), ("1b", "down", 2048, 8192, False, 64, "sm90"),
    ("1b", "down", 2048, 8192, False, 128, "tma"), ("1b", "gate_up", 16384, 2048, True, 64, "tma"),
    ("1b", "qkv", 6144, 2048, False, 256, "tma"), ("1b", "down", 2048, 8192, False, 2048, "tma"),
]


@pytest.mark.parametrize("model,name,N,K,silu,M,winner", MEASURED_TMA_WINNERS)
def test_gemm_plan_picks_the_tma_kernel_where_the_h200_measured_it_faster(model, name, N, K, silu, M, winner):
    plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=True, tma=True)
    assert plan.variant == winner, f"{model} {name} M = {M}: {plan}, measured faster: {winner}"


def test_skinny_plan_with_tma_at_the_7b_decode_batch_of_64():
    plans = {name: kernels.gemm_plan(64, N, K, 132, silu=name == "gate_up", hopper=True, tma=True)
             for name, (N, K) in {"qkv": (12288, 4096), "o_proj": (4096, 4096), "gate_up": (22016, 4096),
                                  "down": (4096, 11008)}.items()}
    assert plans == {"qkv": ("tma", 64, 2), "o_proj": ("sm90", 64, 8), "gate_up": ("tma", 64, 1),
                     "down": ("tma", 64, 8)}


MODEL_DIMS = {"1b": dict(D=2048, I=8192, H=16, Hkv=16, d=128), "7b": dict(D=4096, I=11008, H=32, Hkv=32, d=128)}


@pytest.mark.parametrize("model", MODEL_DIMS)
@pytest.mark.parametrize("hopper,skinny", [(False, True), (True, False), (True, True)])
def test_backend_projection_workspace_covers_every_plan(model, hopper, skinny):
    """The backend sizes its projection buffer with gemm_workspace over its projections (backend.projection_shapes);
    every plan of every step size up to a 2048-row prefill chunk must fit: its partials, or its one [M, N] output."""
    from types import SimpleNamespace

    from olmoscope.runtime.cuda.backend import projection_shapes

    dims = MODEL_DIMS[model]
    cfg = SimpleNamespace(hidden_size=dims["D"], intermediate_size=dims["I"], q_width=dims["H"] * dims["d"],
                          kv_width=dims["Hkv"] * dims["d"])
    shapes = projection_shapes(cfg)
    assert shapes["qkv"] == ((dims["H"] + 2 * dims["Hkv"]) * dims["d"], dims["D"], False)
    assert shapes["gate_up"] == (2 * dims["I"], dims["D"], True) and shapes["down"] == (dims["D"], dims["I"], False)
    for tokens in (256, 2048):
        room = kernels.gemm_workspace(shapes.values(), tokens, 132, hopper=hopper, skinny=skinny)
        for M in range(1, tokens + 1):
            for name, (N, K, silu) in shapes.items():
                plan = kernels.gemm_plan(M, N, K, 132, silu=silu, hopper=hopper, skinny=skinny)
                if not silu or plan.splits > 1:
                    assert plan.splits * M * N <= room, f"{name} M = {M}: {plan} needs {plan.splits * M * N} > {room}"


def test_planner_docstring_examples_hold():
    import doctest

    for function in (kernels.gemm_plan, kernels.gemm_stream_tile, kernels.gemm_workspace, kernels.gemm_stream_plan,
                     kernels.gemm90_splits, kernels.decode_splits, kernels.prefill_tiles):
        runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
        for test in doctest.DocTestFinder().find(function, globs=vars(kernels).copy()):
            runner.run(test)
        assert runner.failures == 0 and runner.tries > 0, f"{function.__name__}'s examples"


def test_gemm_stream_plan_keeps_whole_waves_whole():
    assert kernels.gemm_stream_plan(264, 32, 132) == (132, 0)
    assert kernels.gemm_stream_plan(300, 64, 132) == (132, 168)  # 1 whole wave, 168 tiles streamed
    assert kernels.gemm_stream_plan(2, 16, 132) == (32, 2)  # 32 k-tiles: 32 CTAs of one each
    assert kernels.gemm_stream_plan(96, 32, 132) == (132, 96)


def test_gemm_split_planner_keeps_its_promises_for_explicit_splits():
    for M in (5, 16, 33, 64, 100, 256):
        for N, K in SHAPES:
            for tiles in (kernels.GEMM_TILES, kernels.GEMM_V1_TILES):
                bm = kernels.gemm_tile(M, tiles)
                splits = kernels.gemm_splits(bm, M, N, K, 132, tiles)
                ktiles = math.ceil(K / tiles[bm].bk)
                per_split = kernels.gemm_ktiles_per_split(bm, K, splits, tiles)
                assert 1 <= splits <= kernels.GEMM_MAX_SPLITS
                assert (splits - 1) * per_split < ktiles, "an empty split would write zeros for nothing"
                if splits > 1:
                    assert per_split >= kernels.GEMM_MIN_KTILES_PER_SPLIT
                    assert 8 * splits * M * N <= 2 * N * K, "partials cost more traffic than the weights"


def test_gemm_v1_plan_is_the_old_plan():
    assert kernels.gemm_v1_plan(16, 4096, 4096, 132) == (16, 8)  # 32 column tiles alone would leave 100 SMs idle
    assert kernels.gemm_v1_plan(64, 12288, 4096, 132) == (64, 2)
    assert kernels.gemm_v1_plan(128, 4096, 4096, 132) == (64, 4) and kernels.gemm_v1_plan(256, 4096, 4096, 132)[0] == 128


@pytest.mark.parametrize("B", [1, 8, 16, 32, 64, 128])
@pytest.mark.parametrize("Hkv", [8, 16, 32])
@pytest.mark.parametrize("max_blocks", [1, 8, 32, 256])
def test_decode_splits_give_every_warp_a_block(B, Hkv, max_blocks):
    splits = kernels.decode_splits(B, Hkv, 132, max_blocks)
    assert 1 <= splits <= kernels.DECODE_MAX_SPLITS
    if splits > 1:
        assert max_blocks // splits >= kernels.DECODE_WARPS
        assert B * Hkv * splits <= kernels.CTAS_PER_SM * 132
    if B * Hkv >= kernels.CTAS_PER_SM * 132:
        assert splits == 1


def test_prefill_tiles_cover_every_prefill_row_once():
    rows = np.array([1, 1, 130, 5, 64, 65])
    first = np.concatenate([[0], np.cumsum(rows)[:-1]])
    seq, start = kernels.prefill_tiles(first, rows, decode_seqs=2)
    assert seq.dtype == np.int32 and start.dtype == np.int32
    covered = []
    for s, r in zip(seq, start):
        assert first[s] <= r < first[s] + rows[s]
        covered += list(range(r, min(r + kernels.FA_QUERIES, first[s] + rows[s])))
    assert sorted(covered) == list(range(first[2], first[-1] + rows[-1])), "a prefill row missing or twice"
    assert seq[0] == 2 and start[0] == first[2] + 128, "the longest sequence's last tile goes first"


def test_prefill_kernel_is_the_wgmma_one_on_sm90_where_it_has_the_head_size():
    for d in kernels.HEAD_DIMS:
        assert kernels.prefill_kernel(d, hopper=False) == f"paged_prefill_d{d}"
        want = f"paged_prefill90_d{d}" if d in kernels.HEAD_DIMS_SM90 else f"paged_prefill_d{d}"
        assert kernels.prefill_kernel(d, hopper=True) == want
    import doctest

    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in doctest.DocTestFinder().find(kernels.prefill_kernel, globs=vars(kernels).copy()):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0, "prefill_kernel's examples"


def test_the_wgmma_prefill_pairs_two_query_tiles_and_fits_sm90():
    assert kernels.FA90_QUERIES == 2 * kernels.FA_QUERIES, "a CTA takes two of prefill_tiles' tiles"
    assert kernels.FA90_KEYS % kernels.BLOCK_SIZE == 0 and kernels.FA90_THREADS == 2 * 128
    for d in kernels.HEAD_DIMS_SM90:  # sm_90 only (the kernel is launched nowhere else)
        assert kernels.prefill90_smem(d) <= 227 * 1024
    assert set(kernels.kernel_smem(hopper=True)) >= {f"paged_prefill90_d{d}" for d in kernels.HEAD_DIMS_SM90}
    assert not any(name.startswith("paged_prefill90") for name in kernels.kernel_smem(hopper=False))


@pytest.mark.parametrize("H,Hkv,group", [(32, 32, 1), (16, 8, 2), (8, 2, 4), (40, 8, 8), (10, 2, 8)])
def test_decode_group_rounds_up(H, Hkv, group):
    assert kernels.decode_group(H, Hkv) == group


@pytest.mark.parametrize("H,Hkv", [(6, 4), (18, 1)])
def test_decode_group_refuses_what_no_kernel_serves(H, Hkv):
    with pytest.raises(DeviceError):
        kernels.decode_group(H, Hkv)


def test_shared_memory_fits_every_supported_gpu():
    limit = 163 * 1024  # sm_80's per-block maximum (sm_90: 227 KB)
    assert max(tile.smem for tile in kernels.GEMM_TILES.values()) <= limit
    assert max(tile.smem for tile in kernels.GEMM_V1_TILES.values()) <= limit
    assert kernels.GEMM90_SMEM <= 227 * 1024  # the Hopper GEMM: sm_90 only
    assert all(227 * 1024 // 2 < tile.smem <= 227 * 1024 for tile in kernels.GEMM90_TILES.values())  # one CTA per SM
    # one GEMM CTA per multiprocessor: the stream-K grid (one CTA each) is all resident, none waits for a slot
    assert min(tile.smem for tile in kernels.GEMM_TILES.values()) > 227 * 1024 // 2
    assert max(kernels.decode_smem(d) for d in kernels.HEAD_DIMS) <= limit


def test_the_quantized_kernels_have_every_instantiation_and_a_split_plan_in_one_wave():
    names = set(kernels.SIGNATURES)
    for nt in kernels.Q4_NT:
        assert f"q8_mma_n{nt}" in names and f"q8_mma_silu_n{nt}" in names
        for g in kernels.Q4_GROUPS:
            assert f"q4_mma_g{g}_n{nt}" in names and f"q4_mma_silu_g{g}_n{nt}" in names
    assert [kernels.q4_tiles(m) for m in (1, 8, 9, 16, 17, 32, 33, 64)] == [1, 1, 2, 2, 4, 4, 8, 8]
    with pytest.raises(DeviceError):
        kernels.q4_tiles(65)
    for N, K in SHAPES:
        for nt, warps in kernels.Q4_RESIDENT_WARPS.items():
            tiles, units = N // 16, kernels.q4_units(K, 128, nt)
            split = kernels.q4_split(tiles, units, 132, warps)
            assert split in (1, 2, 4, 8) and (split == 1 or tiles * split <= 132 * warps), (N, K, nt, split)
            assert split == 1 or units >= split, (N, K, nt, split)
