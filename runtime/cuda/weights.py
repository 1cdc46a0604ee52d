"""The model's weights on the GPU, by role: matrices bf16 (int8 engines stay int8 with f32 per-row scales; fp16
and fp32 engines are rounded to bf16 on the way), norms f32. Uploaded through two pinned staging buffers so the
copy of one slab overlaps the host's filling of the next.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from tqdm import tqdm

from olmoscope.runtime.cuda.driver import ITEMSIZE, DeviceBuffer, cuda, free_pinned
from olmoscope.runtime.engine import Weights
from olmoscope.runtime.weights import ModelWeights, model_weights
from olmoscope.spec import EngineTensorSpec

STAGING_BYTES = 64 << 20  # each of the two pinned upload buffers


@dataclass
class DeviceWeight:
    """One tensor on the device; int8 matrices carry their per-row scales."""

    data: DeviceBuffer  # bf16 / i8 matrix [rows, cols], or f32 norm [n]
    scales: DeviceBuffer | None = None  # f32 [rows], int8 only

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + (self.scales.nbytes if self.scales else 0)


def device_dtype(spec: EngineTensorSpec, weights: Weights) -> str:
    """How a tensor is held on the GPU: norms f32, quantized matrices int8, every other matrix bf16."""
    if spec.kind != "matrix":
        return "f32"
    return "i8" if weights.tensor(spec.name).dtype == np.int8 else "bf16"


def device_bytes(weights: Weights) -> int:
    """Device memory the weights take, scales included."""
    total = 0
    for spec in weights.specs.values():
        dtype = device_dtype(spec, weights)
        total += spec.elements * ITEMSIZE[dtype] + (spec.shape[0] * 4 if dtype == "i8" else 0)
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
