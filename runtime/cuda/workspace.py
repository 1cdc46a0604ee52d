"""The CUDA backend's per-step memory: the step's metadata (one host→device copy a step, at fixed addresses that
captured graphs read) and the activations of up to max_step_tokens token rows."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from olmoscope.runtime.cuda.driver import DeviceBuffer, cuda, free_pinned

# field → (dtype, capacity key): every field is 4 bytes wide, so one region holds them all
META_FIELDS = {
    "ids": ("i32", "tokens"), "positions": ("i32", "tokens"), "slots": ("i32", "tokens"),
    "token_state": ("i32", "tokens"),
    "first_row": ("i32", "seqs"), "rows": ("i32", "seqs"), "context": ("i32", "seqs"),
    "logit_rows": ("i32", "logits"),
    "sample_state": ("i32", "samples"), "top_k": ("i32", "samples"),
    "temperature": ("f32", "samples"), "top_p": ("f32", "samples"), "u": ("f32", "samples"),
    "penalty": ("f32", "samples"), "presence": ("f32", "samples"), "frequency": ("f32", "samples"),
    "tile_seq": ("i32", "tiles"), "tile_first_row": ("i32", "tiles"),
    "score_rows": ("i32", "scores"), "score_targets": ("i32", "scores"),
}
NUMPY = {"i32": np.int32, "f32": np.float32}


@dataclass(frozen=True)
class MetaSizes:
    tokens: int  # token rows in a step
    seqs: int  # sequences in a step
    logits: int  # logits rows
    samples: int  # sampled rows
    tiles: int  # prefill attention query tiles
    scores: int  # scored rows (prompt scoring)
    table_width: int  # blocks per block-table row


class StepMeta:
    """A step's arrays at fixed device addresses (fields, then the block tables), filled from pinned host memory.

    Two pinned mirrors alternate so that the host can fill one while the other's copy is still queued.
    """

    def __init__(self, sizes: MetaSizes, alloc, stream):
        self.sizes, self.stream = sizes, stream
        self.offsets: dict[str, int] = {}  # field → offset in 4-byte words
        at = 0
        for name, (_, key) in META_FIELDS.items():
            self.offsets[name] = at
            at += getattr(sizes, key)
        self.offsets["block_tables"] = at
        self.words = at + sizes.seqs * sizes.table_width
        self.device = alloc((self.words,), "i32")
        self.mirrors = [cuda.pagelocked_empty(self.words, np.int32) for _ in range(2)]
        self.sent = [cuda.Event(), cuda.Event()]
        for event in self.sent:
            event.record(stream)
        self.turn = 0

    def field(self, name: str, count: int | None = None) -> DeviceBuffer:
        """The device view of a field: `count` elements (default: its capacity)."""
        if name == "block_tables":
            return DeviceBuffer(self.device.ptr + 4 * self.offsets[name], (self.sizes.seqs, self.sizes.table_width),
                                "i32")
        dtype, key = META_FIELDS[name]
        n = getattr(self.sizes, key) if count is None else count
        return DeviceBuffer(self.device.ptr + 4 * self.offsets[name], (n,), dtype)

    def upload(self, values: dict[str, np.ndarray], seqs: int) -> None:
        """Write the given fields (and `seqs` rows of block tables) into a mirror and queue its copy."""
        mirror = self.mirrors[self.turn]
        self.sent[self.turn].synchronize()  # its previous copy has left it
        for name, array in values.items():
            start = self.offsets[name]
            flat = np.ascontiguousarray(array).reshape(-1)
            if name != "block_tables":
                dtype, key = META_FIELDS[name]
                if flat.size > getattr(self.sizes, key):
                    raise ValueError(f"step metadata {name}: {flat.size} entries, room for {getattr(self.sizes, key)}")
                flat = flat.astype(NUMPY[dtype], copy=False)
            mirror[start:start + flat.size] = flat.view(np.int32)
        end = self.offsets["block_tables"] + seqs * self.sizes.table_width
        cuda.memcpy_htod_async(self.device.ptr, mirror[:end], self.stream)
        self.sent[self.turn].record(self.stream)
        self.turn ^= 1

    def close(self) -> None:
        for mirror in self.mirrors:
            free_pinned(mirror)
        self.mirrors = []
