"""The OLMo 2 model configuration: parsed from config.json, validated before anything is sized from it."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from olmoscope.display import display_name, short_repr
from olmoscope.errors import ConfigError
from olmoscope.readers import read_json

SUPPORTED_MODEL_TYPES = ("olmo2",)
SUPPORTED_ARCHITECTURES = ("Olmo2ForCausalLM",)

# Upper bounds that no sane OLMo 2 reaches; they keep a hostile config from sizing huge allocations.
LIMITS = {
    "hidden_size": 1 << 16,
    "intermediate_size": 1 << 18,
    "num_hidden_layers": 1 << 10,
    "num_attention_heads": 1 << 10,
    "num_key_value_heads": 1 << 10,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 22,
}
MAX_PARAMETERS = 10**13
MAX_CONFIG_BYTES = 1 << 20


@dataclass(frozen=True)
class ModelConfig:
    """An OLMo 2 config.json, validated. Field names are config.json's own.

    >>> ModelConfig.from_dict(json.load(open("config.json"))).head_dim
    128
    """

    hidden_size: int  # D: width of the residual stream
    intermediate_size: int  # I: width of the SwiGLU hidden layer
    num_hidden_layers: int  # L: transformer blocks
    num_attention_heads: int  # H: query heads
    num_key_value_heads: int  # Hkv: key/value heads (GQA when < H)
    vocab_size: int  # V: embedding rows, padded beyond the tokenizer's ids
    max_position_embeddings: int  # the context length the model was trained for
    rope_theta: float  # RoPE base θ
    rms_norm_eps: float  # ε inside every RMSNorm (released files: 1e-6; class default 1e-5)
    tie_word_embeddings: bool  # lm_head shares the embedding matrix
    hidden_act: str = "silu"  # the SwiGLU gate's activation
    eos_token_id: int | None = None  # <|endoftext|> in dolma2
    pad_token_id: int | None = None  # <|pad|> in dolma2
    bos_token_id: int | None = None  # absent in all released models but 32B
    torch_dtype: str | None = None  # the dtype the weights were saved in, as config.json says

    # ── derived ──────────────────────────────────────────────────────────────
    @property
    def head_dim(self) -> int:
        """d = D / H."""
        return self.hidden_size // self.num_attention_heads

    @property
    def queries_per_kv_head(self) -> int:
        """H / Hkv: query heads reading each kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_width(self) -> int:
        """H·d: width of q_proj's output and q_norm."""
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        """Hkv·d: width of k_proj/v_proj's outputs and k_norm."""
        return self.num_key_value_heads * self.head_dim

    def symbols(self) -> dict[str, int]:
        """The letters that tensor-shape formulas are written in (see spec.py)."""
        return {
            "V": self.vocab_size,
            "D": self.hidden_size,
            "I": self.intermediate_size,
            "Hd": self.q_width,
            "Hkvd": self.kv_width,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ── parsing ──────────────────────────────────────────────────────────────
    @classmethod
    def from_dict(cls, raw: Any, origin: str = "config.json") -> ModelConfig:
        """Validate a parsed config.json; every failure is a ConfigError naming `origin`."""
        if not isinstance(raw, dict):
            raise ConfigError(f"{origin}: expected a JSON object, found {type(raw).__name__}")
        _check_model_type(raw, origin)
        fields = {name: _positive_int(raw, name, origin) for name in LIMITS}
        rope_theta = _rope_theta(raw, origin)
        eps = _positive_float(raw.get("rms_norm_eps", 1e-5), "rms_norm_eps", origin)
        if eps >= 1:
            raise ConfigError(f"{origin}: rms_norm_eps {eps} is absurd (must be < 1)")
        if _boolean(raw, "attention_bias", False, origin):
            raise ConfigError(f"{origin}: attention_bias true is not OLMo 2 as released (no biases); unsupported")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"{origin}: hidden_act {short_repr(act)} is unsupported (OLMo 2 uses 'silu')")
        config = cls(
            **fields,
            rope_theta=rope_theta,
            rms_norm_eps=eps,
            tie_word_embeddings=_boolean(raw, "tie_word_embeddings", False, origin),
            hidden_act=act,
            eos_token_id=_token_id(raw, "eos_token_id", origin),
            pad_token_id=_token_id(raw, "pad_token_id", origin),
            bos_token_id=_token_id(raw, "bos_token_id", origin),
            torch_dtype=_dtype_name(raw),
        )
        config._check_consistent(origin)
        config._check_head_dim(raw.get("head_dim"), origin)
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        return cls.from_dict(read_config_json(path), origin=str(path))

    def _check_head_dim(self, head_dim: Any, origin: str) -> None:
        """An explicit head_dim must be the D / H every OLMo 2 has: the tensors are sized from it."""
        if head_dim is None:
            return
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise ConfigError(f"{origin}: head_dim must be an integer, found {short_repr(head_dim)}")
        if head_dim != self.head_dim:
            raise ConfigError(
                f"{origin}: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                f"{self.hidden_size} / {self.num_attention_heads} = {self.head_dim}; olmoscope supports only head_dim = D / H"
            )

    def _check_consistent(self, origin: str) -> None:
        D, H, Hkv = self.hidden_size, self.num_attention_heads, self.num_key_value_heads
        if D % H:
            raise ConfigError(f"{origin}: hidden_size {D} is not divisible by num_attention_heads {H}")
        if H % Hkv:
            raise ConfigError(
                f"{origin}: num_attention_heads {H} is not divisible by num_key_value_heads {Hkv}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{origin}: head_dim {self.head_dim} is odd; RoPE needs an even head_dim")
        from olmoscope.spec import parameter_count  # spec reads config; imported late to avoid a cycle

        if parameter_count(self) > MAX_PARAMETERS:
            raise ConfigError(f"{origin}: {parameter_count(self):,} parameters is beyond any sane model")


def read_config_json(path: str | Path) -> Any:
    """Read and parse a config.json (readers' rules: regular file, size cap, strict JSON) or raise ConfigError."""
    return read_json(path, MAX_CONFIG_BYTES, display_name(str(path)), ConfigError, nonfinite=True)


def _check_model_type(raw: dict, origin: str) -> None:
    model_type = raw.get("model_type")
    architectures = raw.get("architectures") or []
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = f"model_type {short_repr(model_type)}" if model_type is not None else "no model_type"
        if architectures:
            found += f" (architectures {short_repr(architectures)})"
        raise ConfigError(f"{origin}: {found}; only OLMo 2 (model_type 'olmo2', Olmo2ForCausalLM) is supported")
    if not isinstance(architectures, list) or any(a not in SUPPORTED_ARCHITECTURES for a in architectures):
        raise ConfigError(f"{origin}: architectures {short_repr(architectures)}; only Olmo2ForCausalLM is supported")


def _positive_int(raw: dict, name: str, origin: str) -> int:
    if name not in raw:
        if name == "num_key_value_heads" and "num_attention_heads" in raw:
            return _positive_int(raw, "num_attention_heads", origin)  # transformers' default: MHA
        raise ConfigError(f"{origin}: required field {name!r} is missing")
    value = raw[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{origin}: {name} must be an integer, found {short_repr(value)}")
    if value <= 0:
        raise ConfigError(f"{origin}: {name} must be positive, found {value}")
    if value > LIMITS[name]:
        raise ConfigError(f"{origin}: {name} {value:,} is beyond any sane OLMo 2 (limit {LIMITS[name]:,})")
    return value


def _boolean(raw: dict, name: str, default: bool, origin: str) -> bool:
    """A JSON true/false (null means the default): the string "false" is not false, so it is refused."""
    value = raw.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(f"{origin}: {name} must be true or false, found {short_repr(value)}")
    return value


def _positive_float(value: Any, name: str, origin: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{origin}: {name} must be a positive number, found {short_repr(value)}")
    return float(value)


def _rope_theta(raw: dict, origin: str) -> float:
    """θ lives at the top level (transformers 4.x) or in rope_parameters (5.x); scaling is unsupported."""
    params = raw.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise ConfigError(f"{origin}: rope_parameters must be an object, found {short_repr(params)}")
        if params.get("rope_type", "default") != "default":
            raise ConfigError(f"{origin}: rope_type {short_repr(params['rope_type'])} is unsupported (only plain RoPE)")
        if "rope_theta" in params:
            return _positive_float(params["rope_theta"], "rope_theta", origin)
    if raw.get("rope_scaling") is not None:
        raise ConfigError(f"{origin}: rope_scaling {short_repr(raw['rope_scaling'])} is unsupported (OLMo 2 has none)")
    return _positive_float(raw.get("rope_theta", 10000.0), "rope_theta", origin)


def _token_id(raw: dict, name: str, origin: str) -> int | None:
    value = raw.get(name)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{origin}: {name} must be a non-negative integer or null, found {short_repr(value)}")
    return value


def _dtype_name(raw: dict) -> str | None:
    value = raw.get("torch_dtype", raw.get("dtype"))
    return value if isinstance(value, str) else None
