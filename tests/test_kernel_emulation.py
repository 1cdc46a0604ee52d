"""The CUDA kernels' GPU tests on the CPU emulator (tests/cuda_emulator): where CI has no GPU, a representative
subset of tests/test_cuda_kernels.py still runs every kernel family against its NumPy reference. Skipped, and said
so, without g++ (C++20) on x86-64 Linux; the whole file runs with `python tests/cuda_emulator/run.py`."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBSET = " or ".join([
    "embedding_gathers", "prepare_tokens", "mark_seen", "residual_rmsnorm_add_sums_partials_then_norms[64-3-5]",
    "rmsnorm_rows", "refuse_vectors_wider", "residual_rmsnorm_add_sums_partials_then_norms[64-8-4096]",
    "qk_norm_rope_append_writes_q_and_the_paged_slots[64-8-128-False-3-7]", "qk_norm_rope_append_writes_q_and_the_paged_slots[8-2-128", "gemv_every_k_split",
    "gemv_silu_pairs", "gemm_every_tile_and_split_count", "gemm_silu_pairs_gate_and_up[5", "silu_mul_parts",
    "gemm_stream_k_with_any_number_of_ctas", "gemm_stream_k_leaves", "gemm_stream_k_fused_silu", "gemm_v1_kernels",
    "gemm_hopper_wgmma_matches_numpy[130", "gemm_hopper_wgmma_fused_silu", "gemm_hopper_wgmma_split_k_matches_numpy[7-",
    "gemm_hopper_wgmma_split_k_matches_numpy[3-128", "gemm_hopper_wgmma_bm64_rows_past_m",
    "gemm_hopper_wgmma_split_partials_then", "gemm_planned_skinny_wgmma_matches_numpy[64", "gemm_tma_persistent",
    "gemm_tma_encodes",
    "split_gemm_then", "paged_decode_matches_numpy[40-8-128", "paged_decode_sliding_window[1-", "paged_decode_sees",
    "padding_sequences", "paged_prefill_ragged_batch_matches_numpy[37-", "paged_prefill_windows", "paged_prefill_sees",
    "paged_prefill_wgmma_pairs_tiles_across_sequences[0-8-2-128]", "paged_prefill_wgmma_pairs_tiles_across_sequences[129-4-4",
    "paged_prefill_picks_the_wgmma",
    "copy_blocks", "sampling_rows_each", "penalties_per_row", "sampled_tokens_feed", "counted_back", "row_logprobs",
    "sampling_edge_values",
    "q4_matches_numpy_dequantize_then_matmul[asym-128-1]", "q4_matches_numpy_dequantize_then_matmul[sym-32-17]",
    "q4_matches_numpy_dequantize_then_matmul[asym-64-64]", "q4_every_k_split", "q4_silu_pairs", "dequantize_q4_is",
    "q4_beyond_64", "q4_launchers_refuse", "q8_matches_numpy[5]", "q8_silu_pairs", "q8_every_k_split", "q8_beyond_64",
])


# The GEMMs and the wgmma prefill attention again with every cp.async landing when issued (the default lands it at the wait that retires it): one
# schedule shows a read before its data is waited for, the other a stage refilled while a warp (or an asynchronous
# wgmma) may still read it.
EAGER_SUBSET = " or ".join([
    "gemm_every_tile_and_split_count", "gemm_stream_k_with_any_number_of_ctas", "gemm_stream_k_fused_silu",
    "gemm_hopper_wgmma_matches_numpy[300", "gemm_hopper_wgmma_fused_silu", "gemm_hopper_wgmma_split_k_matches_numpy[1-",
    "gemm_hopper_wgmma_split_k_matches_numpy[2-64-100", "gemm_hopper_wgmma_fused_silu_and_int8_scales[64-64",
    "gemm_tma_persistent", "q4_beyond_64",
    "paged_prefill_wgmma_pairs_tiles_across_sequences[0-", "paged_prefill_ragged_batch_matches_numpy[37-16-2-128-sm90]",
    "q8_beyond_64", "q8_every_k_split",
])
# The int8 kernels' weight ring as GPUs before sm_90 build it (a cp.async per lane and chunk, no bulk copies).
CP_ASYNC_RING_SUBSET = "q8_matches_numpy or q8_every_k_split or q8_silu_pairs"
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None or platform.machine() != "x86_64" or sys.platform != "linux",
                               reason="the CUDA emulator needs g++ on x86-64 Linux: the kernels did NOT run on the CPU")


@pytest.mark.slow
@needs_gxx
@pytest.mark.parametrize("subset,eager,defines", [(SUBSET, False, ""), (EAGER_SUBSET, True, ""),
                                                  (CP_ASYNC_RING_SUBSET, False, "OS_RING_BULK=0"),
                                                  (CP_ASYNC_RING_SUBSET, True, "OS_RING_BULK=0")],
                         ids=["waited", "eager", "cp.async-ring-waited", "cp.async-ring-eager"])
def test_kernels_pass_their_gpu_tests_on_the_cpu_emulator(tmp_path, subset, eager, defines):
    env = {**os.environ, "OLMOSCOPE_EMU_BUILD": str(tmp_path), "EMU_CP_ASYNC_EAGER": "1" if eager else "0",
           "EMU_DEFINES": defines}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "cuda_emulator" / "run.py"), "-q", "-k", subset,
                             "-p", "no:cacheprovider"], capture_output=True, text=True, cwd=ROOT, timeout=1800, env=env)
    tail = "\n".join((result.stdout + result.stderr).splitlines()[-25:])
    assert result.returncode == 0, f"emulated kernel tests failed:\n{tail}"
    assert " passed" in result.stdout and "no tests ran" not in result.stdout, tail
