"""The model's weights on the GPU, by role: matrices bf16 (int8 and int4 matrices are repacked into the layout of
cuda/gemm_quant.cu's kernels, runtime/cuda/quant_layout.py, but an int8 embedding, which the gather reads by row, and
with it a tied lm_head; fp16 and fp32 engines are rounded to bf16 on the way), norms f32. Uploaded through two pinned staging buffers so the copy of one slab overlaps the host's
filling of the next.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from tqdm import tqdm

from olmoscope.runtime.cuda.driver import ITEMSIZE, DeviceBuffer, cuda, free_pinned
from olmoscope.runtime.cuda.quant_layout import Q4_TILE_ROWS, Q4Device, Q8Device, pack_q4, pack_q8, q4_device_bytes
from olmoscope.runtime.engine import Weights
from olmoscope.runtime.weights import ModelWeights, model_weights
from olmoscope.spec import EngineTensorSpec

STAGING_BYTES = 64 << 20  # each of the two pinned upload buffers


@dataclass
class DeviceWeight:
    """One tensor on the device; int8 matrices carry their per-row scales, int4 ones their group scales and zeros.
    A packed matrix (pack_q4, pack_q8: the kernels' tile layout, rows padded to 16) keeps its own [N, K] beside the
    packed buffer's shape."""

    data: DeviceBuffer  # bf16 / i8 matrix [rows, cols], f32 norm [n], int8 i8 [Np, K] (pack_q8), int4 u8 [Np, K/2]
    scales: DeviceBuffer | None = None  # f32 [rows] (int8; packed: [Np] in tile order), f16 [Np, K/G] (int4)
    zeros: DeviceBuffer | None = None  # int4 asymmetric: u8 [Np/2, K/G]
    shape: tuple[int, int] | None = None  # packed: [N, K] of the matrix the packed data holds
    pairs: bool = False  # packed gate_up: rows as gate/up pairs for the SiLU epilogue

    @property
    def int4(self) -> bool:
        return self.data.dtype == "u8"

    @property
    def q8(self) -> bool:
        """int8 in pack_q8's layout (gemm_q8, dequantize_q8); an unpacked int8 matrix is the embedding's."""
        return self.data.dtype == "i8" and self.shape is not None

    @property
    def int8_rows(self) -> bool:
        """int8 in the engine's row order (the embedding, or a matrix that was not packed): gemv reads it as is."""
        return self.data.dtype == "i8" and self.shape is None

    @property
    def matrix_shape(self) -> tuple[int, ...]:
        return self.shape or self.data.shape

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in (self.data, self.scales, self.zeros) if b is not None)


def device_dtype(spec: EngineTensorSpec, weights: Weights) -> str:
    """How a tensor is held on the GPU: norms f32, int8 matrices i8, int4 ones u8 (packed), every other bf16."""
    if spec.kind != "matrix":
        return "f32"
    return {np.dtype(np.int8): "i8", np.dtype(np.uint8): "u8"}.get(weights.tensor(spec.name).dtype, "bf16")


def int4_packed(spec: EngineTensorSpec, weights: Weights) -> Q4Device:
    """An int4 matrix in the kernels' layout; gate_up paired for the fused SiLU·up."""
    m = weights.matrix(spec.name)
    return pack_q4(np.asarray(m.data), np.asarray(m.scales), None if m.zeros is None else np.asarray(m.zeros),
                   pairs=spec.role == "gate_up")


def packs_int8(spec: EngineTensorSpec, dtype: str) -> bool:
    """Whether an int8 matrix goes to the device in pack_q8's layout: all but the embedding (gathered by row; a tied
    lm_head is the same tensor, through the int8 GEMV)."""
    return dtype == "i8" and spec.role != "embedding"


def int8_packed(spec: EngineTensorSpec, weights: Weights) -> Q8Device:
    """An int8 matrix in the kernels' layout; gate_up paired for the fused SiLU·up."""
    return pack_q8(np.asarray(weights.tensor(spec.name)), np.asarray(weights.scales(spec.name), np.float32),
                   pairs=spec.role == "gate_up")


def device_bytes(weights: Weights) -> int:
    """Device memory the weights take, scales and zeros included."""
    total = 0
    for spec in weights.specs.values():
        dtype = device_dtype(spec, weights)
        if dtype == "u8":
            m = weights.matrix(spec.name)
            total += q4_device_bytes(*spec.shape, m.group_size, m.zeros is not None)
        elif dtype == "i8":
            rows = -(-spec.shape[0] // Q4_TILE_ROWS) * Q4_TILE_ROWS if packs_int8(spec, dtype) else spec.shape[0]
            total += rows * (spec.shape[1] + 4)
        else:
            total += spec.elements * ITEMSIZE[dtype]
    return total


class Uploader:
    """Host → device through two pinned buffers, in the engine's order."""

    def __init__(self, stream, alloc, progress: bool, total: int):
        self.stream, self.alloc = stream, alloc
        self.staging = [cuda.pagelocked_empty(STAGING_BYTES, np.uint8) for _ in range(2)]
        self.done = [cuda.Event(), cuda.Event()]
        self.turn = 0
        self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="uploading weights", disable=not progress,
                        file=sys.stderr)

    def send(self, dest: int, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        for start in range(0, data.size, STAGING_BYTES):
            part = data[start:start + STAGING_BYTES]
            self.done[self.turn].synchronize()  # the buffer's previous copy has left it
            self.staging[self.turn][: part.size] = part
            cuda.memcpy_htod_async(dest + start, self.staging[self.turn][: part.size], self.stream)
            self.done[self.turn].record(self.stream)
            self.turn ^= 1
            self.bar.update(part.size)

    def tensor(self, spec: EngineTensorSpec, weights: Weights) -> DeviceWeight:
        array = weights.tensor(spec.name)
        dtype = device_dtype(spec, weights)
        if dtype == "u8":
            return self.int4(int4_packed(spec, weights))
        if packs_int8(spec, dtype):
            return self.int8(int8_packed(spec, weights))
        buffer = self.alloc(tuple(array.shape), dtype)
        if dtype == "f32":
            self.send(buffer.ptr, np.asarray(array, dtype=np.float32))
            return DeviceWeight(buffer)
        if dtype == "i8":
            self.send(buffer.ptr, array)
            scales = np.ascontiguousarray(weights.scales(spec.name), dtype=np.float32)
            scale_buffer = self.alloc(scales.shape, "f32")
            self.send(scale_buffer.ptr, scales)
            return DeviceWeight(buffer, scale_buffer)
        rows_per_part = max(1, STAGING_BYTES // (2 * array.shape[1]))
        for r in range(0, array.shape[0], rows_per_part):  # fp16/fp32 → bf16 a slab at a time
            part = np.asarray(array[r:r + rows_per_part]).astype(ml_dtypes.bfloat16, copy=False)
            self.send(buffer.ptr + r * array.shape[1] * 2, part)
        return DeviceWeight(buffer)

    def int4(self, packed: Q4Device) -> DeviceWeight:
        parts = []
        for array, dtype in ((packed.qweight, "u8"), (packed.scales, "f16"), (packed.zeros, "u8")):
            if array is None:
                parts.append(None)
                continue
            buffer = self.alloc(tuple(array.shape), dtype)
            self.send(buffer.ptr, array)
            parts.append(buffer)
        return DeviceWeight(*parts, shape=(packed.N, packed.K), pairs=packed.pairs)

    def int8(self, packed: Q8Device) -> DeviceWeight:
        data, scales = self.alloc(packed.qweight.shape, "i8"), self.alloc(packed.scales.shape, "f32")
        self.send(data.ptr, packed.qweight)
        self.send(scales.ptr, packed.scales)
        return DeviceWeight(data, scales, shape=(packed.N, packed.K), pairs=packed.pairs)

    def close(self) -> None:
        self.stream.synchronize()
        self.bar.close()
        for buffer in self.staging:
            free_pinned(buffer)


def upload(weights: Weights, stream, alloc, progress: bool) -> ModelWeights[DeviceWeight]:
    """Every engine tensor to the GPU, placed by role."""
    uploader = Uploader(stream, alloc, progress, device_bytes(weights))
    try:
        return model_weights(weights.specs.values(), lambda spec: uploader.tensor(spec, weights))
    finally:
        uploader.close()


def decode_weight_bytes(model: ModelWeights[DeviceWeight], batch: int) -> int:
    """Weight bytes one decode step of `batch` sequences reads: every matrix once, `batch` embedding rows."""
    layers = sum(w.nbytes for layer in model.layers for w in vars(layer).values())
    rows = model.embedding.nbytes // model.embedding.data.shape[0] * batch  # the gather (tied: the head reads all)
    return layers + rows + model.lm_head.nbytes + model.final_norm.nbytes
