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
from olmoscope.engine_format import Quantization, default_quantization
from olmoscope.errors import EngineError
from olmoscope.spec import engine_tensors
from olmoscope.weight_formats import FORMATS, WeightFormat

# numpy dtype of a stored matrix → the engine's weight dtype name (uint8: packed int4 pairs)
WEIGHT_DTYPES = {
    np.dtype(ml_dtypes.bfloat16): "bf16",
    np.dtype(np.float16): "fp16",
    np.dtype(np.float32): "fp32",
    np.dtype(np.int8): "int8",
    np.dtype(np.uint8): "int4",
}


@dataclass(frozen=True)
class QuantizedMatrix:
    """A quantized matrix as stored, with everything needed to dequantize it (weight_formats.py).

    int8: data int8 [N, K], scales float32 [N]. int4: data uint8 [N, K/2] (two inputs per byte, the even
    one in the low nibble), scales float16 [N, K/G], zeros uint8 [N, K/G] or None (symmetric: zero 8).
    """

    format: WeightFormat  # FORMATS["int8"] or FORMATS["int4"]: the kernel variant is format.kernel
    data: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray | None
    group_size: int | None  # int4: inputs per scale; int8: None (one scale per row)

    def float32(self, rows=slice(None)) -> np.ndarray:
        """float32 [rows, K]: (q − z)·s, or q·s for int8; only the rows asked for are dequantized."""
        zeros = None if self.zeros is None else self.zeros[rows]
        return self.format.decode(self.data[rows], self.scales[rows], zeros, self.group_size)


class Weights:
    """The engine's tensors by engine name (spec.engine_tensors), in their stored dtype.

    Matrices are bf16, fp16 or fp32; in int8 and int4 files they are quantized (`matrix(name)` gives a
    QuantizedMatrix), except those the format keeps wide (the embedding, gathered by row; int4's lm_head
    unless quantized too). Norms are float32. Upcasting is the backend's business: `float32(name)` gives
    the reference's view.

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
        zeros: Mapping[str, np.ndarray] | None = None,
        quantization: Quantization | None = None,
    ):
        self.config = config  # the model these tensors belong to
        self.origin = origin  # named in errors: the engine file's path, or "weights"
        self._tensors = tensors  # engine name → array as stored
        self._scales = dict(scales or {})  # engine name → scales, quantized matrices only
        self._zeros = dict(zeros or {})  # engine name → uint8 zero points, asymmetric int4 matrices only
        self.specs = {spec.name: spec for spec in engine_tensors(config)}  # what must be present
        self.dtype = dtype or self._weight_dtype()  # "bf16" | "fp16" | "fp32" | "int8" | "int4"
        self.format = FORMATS[self.dtype]  # the weight-format record: kernel variant, scales, bytes
        self.quantization = quantization or default_quantization(self.dtype)  # group size, scheme, source

    def _weight_dtype(self) -> str:
        """The matrices' dtype, read from the arrays: the quantized one when any is, else the embedding's."""
        for name in self._scales:
            return WEIGHT_DTYPES[self._tensors[name].dtype]
        embedding = self.tensor("embedding")
        dtype = WEIGHT_DTYPES.get(embedding.dtype)
        if dtype is None or FORMATS[dtype].quantized:
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
        """The array as stored (int4: packed bytes [N, K/2]), shape-checked against the config."""
        spec = self.specs.get(name)
        if spec is None:
            raise EngineError(f"{self.origin}: {name!r} is not a tensor of this model")
        if name not in self._tensors:
            raise EngineError(f"{self.origin}: tensor {name!r} is missing")
        array = self._tensors[name]
        fmt = FORMATS.get(WEIGHT_DTYPES.get(array.dtype, ""))
        expected = fmt.data_shape(spec.shape) if fmt is not None else spec.shape
        if tuple(array.shape) != expected:
            raise EngineError(
                f"{self.origin}: tensor {name!r} has shape {list(array.shape)}, expected {list(expected)}"
            )
        return array

    def is_quantized(self, name: str) -> bool:
        return name in self._scales

    def scales(self, name: str) -> np.ndarray:
        """A quantized matrix's scales: float32 [rows] (int8) or float16 [rows, K/G] (int4)."""
        if name not in self._scales:
            raise EngineError(f"{self.origin}: tensor {name!r} is not quantized; it has no scales")
        return self._scales[name]

    def matrix(self, name: str) -> QuantizedMatrix:
        """A quantized matrix by name: its data, scales, zero points and group size."""
        data, scales = self.tensor(name), self.scales(name)
        fmt = FORMATS[WEIGHT_DTYPES[data.dtype]]
        group = self.quantization.group_size if fmt.group == "group" else None
        return QuantizedMatrix(fmt, data, scales, self._zeros.get(name), group)

    def float32(self, name: str, rows=slice(None)) -> np.ndarray:
        """The tensor (or some of its rows) as float32: the stored array itself when already float32, else an
        upcast or dequantized copy."""
        if self.is_quantized(name):
            return self.matrix(name).float32(rows)
        return np.asarray(self.tensor(name)[rows], dtype=np.float32)

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
        zeros: Mapping[str, np.ndarray] | None = None,
        quantization: Quantization | None = None,
    ) -> Engine:
        """An engine built in memory from arrays under engine names (tests, tools).

        >>> Engine.from_arrays(config, arrays).weights.dtype  # arrays: engine name → float32 array
        'fp32'
        """
        weights = Weights(config, tensors, scales, zeros=zeros, quantization=quantization)
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
        quantized = [entry.name for entry in engine_file.entries if entry.quantization is not None]
        # small next to their matrices: read (and checked) at open
        read_scales = engine_file.checked_scales if verify else engine_file.scales
        read_zeros = engine_file.checked_zeros if verify else engine_file.zeros
        scales = {name: read_scales(name) for name in quantized}
        zeros = {name: z for name in quantized if (z := read_zeros(name)) is not None}
        weights = Weights(config, tensors, scales, origin=str(path), dtype=engine_file.weight_dtype, zeros=zeros,
                          quantization=engine_file.quantization)
        generation = GenerationInfo.from_dict(engine_file.generation, config)
        return Engine(config, weights, generation, engine_file.tokenizer_json, path, engine_file)
    except BaseException:
        engine_file.close()
        raise
