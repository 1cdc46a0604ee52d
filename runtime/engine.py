"""An engine file as the runtime sees it: config, weights by engine name, tokenizer and generation defaults.

The runtime reads only engine files (olmoscope.engine_format); `Engine.from_arrays` builds the same view
from in-memory arrays, for tests and tools that fuse a checkpoint themselves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from olmoscope.config import ModelConfig
from olmoscope.errors import EngineError
from olmoscope.spec import engine_tensors

# numpy dtype → the engine's weight dtype name
WEIGHT_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): "bf16",
    np.dtype(np.float16): "fp16",
    np.dtype(np.float32): "fp32",
    np.dtype(np.int8): "int8",
}


class Weights:
    """The engine's tensors by engine name (spec.engine_tensors), in their stored dtype.

    Matrices are bf16, fp16 or fp32; in int8 files they are int8 with float32 per-row scales (w ≈ q·scale),
    except those the format keeps wide (the embedding, gathered by row). Norms are float32. Upcasting is
    the backend's business: `float32(name)` gives the reference's view.

    >>> weights.tensor("layers.0.qkv").shape   # [Hd + 2·Hkvd, D], rows [q; k; v]
    (384, 128)
    """

    def __init__(
        self,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        scales: Mapping[str, np.ndarray] | None = None,
        origin: str = "weights",
        dtype: str | None = None,
    ):
        self.config = config  # the model these tensors belong to
        self.origin = origin  # named in errors: the engine file's path, or "weights"
        self._tensors = tensors  # engine name → array as stored
        self._scales = dict(scales or {})  # engine name → float32 [rows], int8 matrices only
        self.specs = {spec.name: spec for spec in engine_tensors(config)}  # what must be present
        self.dtype = dtype or self._weight_dtype()  # "bf16" | "fp16" | "fp32" | "int8"

    def _weight_dtype(self) -> str:
        """The matrices' dtype, read from the arrays: int8 when any is quantized, else the embedding's."""
        if self._scales:
            return "int8"
        embedding = self.tensor("embedding")
        dtype = WEIGHT_DTYPES.get(embedding.dtype)
        if dtype is None or dtype == "int8":
            raise EngineError(f"{self.origin}: embedding has unsupported dtype {embedding.dtype}")
        return dtype

    @property
    def names(self) -> list[str]:
        """Engine tensor names in the order the runtime consumes them."""
        return list(self.specs)

    @property
    def head_name(self) -> str:
        """The tensor the lm_head reads: its own, or the embedding when tied."""
        return "lm_head" if "lm_head" in self.specs else "embedding"

    def tensor(self, name: str) -> np.ndarray:
        """The array as stored, shape-checked against the config."""
        spec = self.specs.get(name)
        if spec is None:
            raise EngineError(f"{self.origin}: {name!r} is not a tensor of this model")
        if name not in self._tensors:
            raise EngineError(f"{self.origin}: tensor {name!r} is missing")
        array = self._tensors[name]
        if tuple(array.shape) != spec.shape:
            raise EngineError(
                f"{self.origin}: tensor {name!r} has shape {list(array.shape)}, expected {list(spec.shape)}"
            )
        return array

    def scales(self, name: str) -> np.ndarray:
        """float32 [rows] per-row scales of an int8 matrix."""
        if name not in self._scales:
            raise EngineError(f"{self.origin}: int8 tensor {name!r} has no scales")
        return self._scales[name]

    def float32(self, name: str) -> np.ndarray:
        """The tensor as float32: the stored array itself when already float32, else an upcast copy."""
        array = self.tensor(name)
        if array.dtype == np.int8:
            return array.astype(np.float32) * self.scales(name).astype(np.float32)[:, None]
        return np.asarray(array, dtype=np.float32)

    def layer(self, layer: int) -> dict[str, np.ndarray]:
        """One block's tensors by role (qkv, q_norm, k_norm, o_proj, …), as stored."""
        return {spec.role: self.tensor(spec.name) for spec in self.specs.values() if spec.layer == layer}


@dataclass(frozen=True)
class GenerationInfo:
    """What an engine file says about generating: stop tokens, special ids, the chat template."""

    eos_token_ids: tuple[int, ...] = ()  # generation ends when one of these is sampled
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    chat_template: str | None = None  # jinja2 source; None → OLMo 2 Instruct's (tokenizer.py)
    tokenizer_vocab_size: int | None = None  # ids below this are real tokens; the rest are padding rows

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, config: ModelConfig) -> GenerationInfo:
        raw = raw or {}
        eos = raw.get("eos_token_ids")
        if eos is None:
            eos = [config.eos_token_id] if config.eos_token_id is not None else []
        return cls(
            eos_token_ids=tuple(int(i) for i in eos),
            pad_token_id=raw.get("pad_token_id", config.pad_token_id),
            bos_token_id=raw.get("bos_token_id", config.bos_token_id),
            chat_template=raw.get("chat_template"),
            tokenizer_vocab_size=raw.get("tokenizer_vocab_size"),
        )


@dataclass
class Engine:
    """An open engine: everything needed to generate. Close it (or use `with`) to release the file.

    >>> with open_engine("olmo2-1b.olmo") as engine: engine.config.num_hidden_layers
    16
    """

    config: ModelConfig  # the model
    weights: Weights  # tensors by engine name
    generation: GenerationInfo = field(default_factory=GenerationInfo)  # stop tokens, chat template
    tokenizer_json: str | None = None  # tokenizer.json text, when the file carries one
    path: Path | None = None  # the engine file, None when built in memory
    _file: Any = None  # the open EngineFile whose memory map the weights view

    @classmethod
    def from_arrays(
        cls,
        config: ModelConfig,
        tensors: Mapping[str, np.ndarray],
        scales: Mapping[str, np.ndarray] | None = None,
        generation: GenerationInfo | None = None,
        tokenizer_json: str | None = None,
    ) -> Engine:
        """An engine built in memory from arrays under engine names (tests, tools).

        >>> Engine.from_arrays(config, arrays).weights.dtype  # arrays: engine name → float32 array
        'fp32'
        """
        weights = Weights(config, tensors, scales)
        generation = generation or GenerationInfo.from_dict(None, config)
        return cls(config, weights, generation, tokenizer_json)

    @property
    def label(self) -> str:
        return str(self.path) if self.path else "in-memory engine"

    @property
    def vocab_limit(self) -> int:
        """Ids below this are real tokens; rows at or above it are padding, never sampled."""
        limit = self.generation.tokenizer_vocab_size or self.config.vocab_size
        return min(limit, self.config.vocab_size)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _EngineTensors(Mapping):
    """Engine-file tensors looked up lazily by name (each a read-only view of the memory map).

    With `verify`, a tensor's checksum is recomputed the first time it is looked up, so a backend that
    reads every weight to upload or upcast it has checked every weight (and reads no corrupt one).
    """

    def __init__(self, engine_file, names: list[str], verify: bool):
        self._file = engine_file
        self._names = set(names)
        self._order = names
        self._get = engine_file.checked_tensor if verify else engine_file.tensor

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._get(name)

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._names)


def open_engine(path: str | Path, verify: bool = True) -> Engine:
    """Open an engine file for generation (header validated by the reader; tensors stay memory-mapped).

    With `verify` (the default) every tensor's checksum is checked as the backend first reads it, and a
    mismatch is an EngineError naming the tensor; `verify=False` (`--no-verify`) skips those checks. The
    header is checked on every open either way.

    >>> open_engine("olmo2-1b.olmo").weights.dtype
    'bf16'
    """
    from olmoscope.engine_format import EngineFile

    path = Path(path)
    if path.is_dir():
        raise EngineError(f"{path}: a directory, not an engine file (`olmoscope convert {path} -o FILE` makes one)")
    engine_file = EngineFile.open(path)  # a missing file, a FIFO or a device: one EngineError, never a hang
    try:
        config = engine_file.config
        names = [spec.name for spec in engine_tensors(config)]
        tensors = _EngineTensors(engine_file, names, verify)
        quantized = {entry.name for entry in engine_file.entries if entry.quantization is not None}
        read_scales = engine_file.checked_scales if verify else engine_file.scales  # small: checked at open
        scales = {name: read_scales(name) for name in names if name in quantized}
        weights = Weights(config, tensors, scales, origin=str(path), dtype=engine_file.weight_dtype)
        generation = GenerationInfo.from_dict(engine_file.generation, config)
        return Engine(config, weights, generation, engine_file.tokenizer_json, path, engine_file)
    except BaseException:
        engine_file.close()
        raise
