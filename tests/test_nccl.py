"""NCCL through ctypes (runtime/cuda/nccl.py): the constants mirrored from nccl.h, a communicator, all-reduce and
all-gather on the GPU, and both captured in a CUDA graph (tensor parallelism's decode graphs hold them).

On one GPU a communicator has one rank (NCCL refuses two ranks on one device); the two-rank test runs only on a
machine with two GPUs, and is skipped, saying so, elsewhere. Without the nvidia-nccl wheel (CI) the module's
error is checked instead."""

from __future__ import annotations

import multiprocessing
import re

import numpy as np
import pytest

from olmoscope.errors import DeviceError
from olmoscope.runtime.cuda import nccl as N


def test_without_the_library_the_error_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("OLMOSCOPE_NCCL", str(tmp_path / "libnccl.so.2"))
    with pytest.raises(DeviceError, match="cannot load NCCL from"):
        N.Nccl.load()


def test_nvlink_multicast_left_on_is_refused(monkeypatch):
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "1")
    with pytest.raises(DeviceError, match="NVLink multicast off"):
        N.Nccl.load()


def _installed() -> bool:
    try:
        N.library_path()
        return True
    except DeviceError:
        return False


needs_nccl = pytest.mark.skipif(not _installed(), reason="no nvidia-nccl wheel here: NCCL did NOT run")


@needs_nccl
def test_the_constants_mirror_ncclh():
    header = N.header_path()
    if header is None:
        pytest.skip("the wheel ships no nccl.h: the mirror was NOT checked")
    text = header.read_text()
    assert int(re.search(r"#define NCCL_UNIQUE_ID_BYTES (\d+)", text).group(1)) == N.UNIQUE_ID_BYTES
    names = {"i8": "ncclInt8", "u8": "ncclUint8", "i32": "ncclInt32", "u32": "ncclUint32", "i64": "ncclInt64",
             "u64": "ncclUint64", "f16": "ncclFloat16", "f32": "ncclFloat32", "f64": "ncclFloat64",
             "bf16": "ncclBfloat16"}
    for ours, theirs in names.items():
        assert int(re.search(rf"\b{theirs}\s*=\s*(\d+)", text).group(1)) == N.DATA_TYPES[ours], theirs
    for op in N.REDUCTIONS:
        assert int(re.search(rf"\bncc{'l' + op.capitalize()}\s*=\s*(\d+)", text).group(1)) == N.REDUCTIONS[op], op


cuda_stack = pytest.importorskip("olmoscope.runtime.cuda.driver")
available, why = cuda_stack.available()
gpu = pytest.mark.skipif(not available, reason=f"no CUDA GPU here ({why}): NCCL did NOT run")


@pytest.mark.cuda
@gpu
@needs_nccl
def test_one_rank_all_reduce_and_all_gather_eagerly_and_inside_a_cuda_graph():
    from olmoscope.runtime.cuda.driver import CudaGraph, cuda

    device = cuda.Device(0)
    context = device.retain_primary_context()
    context.push()
    try:
        nccl = N.Nccl.load()
        assert nccl.version >= 21800
        comm = nccl.communicator(nccl.unique_id(), ranks=1, rank=0)
        stream = cuda.Stream()
        values = np.arange(1000, dtype=np.float32) - 300.5
        source, target = cuda.mem_alloc(values.nbytes), cuda.mem_alloc(values.nbytes)
        cuda.memcpy_htod(source, values)
        comm.all_reduce(int(source), int(target), values.size, "f32", stream.handle)
        stream.synchronize()
        got = np.empty_like(values)
        cuda.memcpy_dtoh(got, target)
        assert np.array_equal(got, values), "one rank's sum is its own values"
        graph = CudaGraph(stream)
        cuda.memset_d32(target, 0, values.size)
        graph.capture(lambda: comm.all_gather(int(source), int(target), values.size, "f32", stream.handle))
        for _ in range(3):
            graph.launch()
        stream.synchronize()
        cuda.memcpy_dtoh(got, target)
        assert np.array_equal(got, values), "the captured all-gather replayed wrong"
        graph.close()
        comm.close()
    finally:
        cuda.Context.pop()


def _rank(rank: int, uid: bytes, answers) -> None:
    from olmoscope.runtime.cuda.driver import cuda

    cuda.init()
    context = cuda.Device(rank).retain_primary_context()
    context.push()
    try:
        nccl = N.Nccl.load()
        comm = nccl.communicator(uid, ranks=2, rank=rank)
        values = np.full(256, rank + 1, np.float32)
        buffer = cuda.mem_alloc(values.nbytes)
        cuda.memcpy_htod(buffer, values)
        stream = cuda.Stream()
        comm.all_reduce(int(buffer), int(buffer), values.size, "f32", stream.handle)
        stream.synchronize()
        cuda.memcpy_dtoh(values, buffer)
        answers.put((rank, float(values.min()), float(values.max())))
        comm.close()
    finally:
        cuda.Context.pop()


@pytest.mark.cuda
@gpu
@needs_nccl
def test_two_ranks_in_two_processes_sum_over_both_gpus():
    from olmoscope.runtime.cuda.driver import cuda

    if cuda.Device.count() < 2:
        pytest.skip(f"{cuda.Device.count()} GPU here: the two-rank all-reduce did NOT run")
    uid = N.Nccl.load().unique_id()
    spawn = multiprocessing.get_context("spawn")
    answers = spawn.Queue()
    ranks = [spawn.Process(target=_rank, args=(r, uid, answers)) for r in range(2)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(120)
    assert [p.exitcode for p in ranks] == [0, 0]
    assert sorted(answers.get(timeout=5) for _ in range(2)) == [(0, 3.0, 3.0), (1, 3.0, 3.0)]
