"""`olmoscope make-tiny`: write a small random OLMo 2 snapshot that transformers and olmoscope both load.

The snapshot looks like a real download: config.json, generation_config.json, the real dolma2
tokenizer.json, tokenizer_config.json with the OLMo 2 Instruct chat template, and sharded safetensors
with an index — by default split so that one layer's tensors straddle two shards. Only numpy and
safetensors are used (no torch), so it works wherever olmoscope does.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import click
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from olmoscope.config import ModelConfig
from olmoscope.errors import OlmoscopeError, UsageError
from olmoscope.spec import TensorSpec, checkpoint_tensors, parameter_count

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16"}

EOS_TOKEN_ID = 100257  # <|endoftext|> in dolma2
PAD_TOKEN_ID = 100277  # <|pad|> in dolma2
INIT_STD = 0.02  # matrices ~ N(0, 0.02²), the released models' initializer_range
MAX_SNAPSHOT_BYTES = 8 << 30  # a "tiny" model past 8 GiB is a mistyped dimension
NORM_JITTER = 0.1  # norm weights 1 + N(0, 0.1²), so a forward pass that skips a norm is caught

# OLMO2.md: <|endoftext|>, then <|system|>\n…\n, <|user|>\n…\n, <|assistant|>\n…<|endoftext|>\n per message;
# a generation prompt ends with <|assistant|>\n. Role markers are plain text.
CHAT_TEMPLATE = (
    "{{ '<|endoftext|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\n' + message['content'] + '<|endoftext|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# Files a snapshot of ours consists of; --force replaces exactly these in a non-empty directory.
SNAPSHOT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
)
SHARD_GLOB = "model-*-of-*.safetensors"


def tiny_config(
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    vocab_size: int = 100352,
    dtype: str = "float32",
    max_position_embeddings: int = 4096,
) -> dict[str, Any]:
    """The config.json of a tiny model, with the released models' fields (OLMO2.md), validated.

    >>> tiny_config(hidden_size=128)["intermediate_size"]
    352
    """
    if intermediate_size is None and isinstance(hidden_size, int) and not isinstance(hidden_size, bool):
        # SwiGLU's 8/3·D, rounded up to a multiple of 32 (integer math: ⌈8·D / 96⌉·32)
        intermediate_size = max(32, -(-8 * hidden_size // 96) * 32)
    dtype = _dtype_name(dtype)
    eos, pad = EOS_TOKEN_ID, PAD_TOKEN_ID
    if isinstance(vocab_size, int) and vocab_size <= max(eos, pad):
        # A vocabulary smaller than dolma2's ids: keep the special ids inside it.
        eos, pad = vocab_size - 1, max(vocab_size - 2, 0)
    raw = {
        "architectures": ["Olmo2ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "eos_token_id": eos,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "initializer_range": INIT_STD,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "model_type": "olmo2",
        "num_attention_heads": num_heads,
        "num_hidden_layers": num_layers,
        "num_key_value_heads": num_heads if num_kv_heads is None else num_kv_heads,
        "pad_token_id": pad,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 500000,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    ModelConfig.from_dict(raw, origin="make-tiny")  # the same rules as any config.json
    return raw


def make_tiny(
    directory: str | Path,
    *,
    seed: int = 0,
    max_shard_bytes: int | None = None,
    force: bool = False,
    **dims: Any,
) -> Path:
    """Write a random OLMo 2 snapshot to `directory` and return its path. Same seed, same bytes.

    `dims` are tiny_config's keywords (hidden_size, intermediate_size, num_layers, num_heads, num_kv_heads,
    vocab_size, dtype, max_position_embeddings).

    >>> make_tiny("tiny", num_kv_heads=2, vocab_size=512)
    PosixPath('tiny')
    """
    raw = tiny_config(**dims)
    config = ModelConfig.from_dict(raw, origin="make-tiny")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise UsageError(f"--seed must be a non-negative integer, found {seed!r}")
    weight_dtype = DTYPES[raw["torch_dtype"]]
    size = parameter_count(config) * weight_dtype.itemsize
    if size > MAX_SNAPSHOT_BYTES:
        limit = f"{MAX_SNAPSHOT_BYTES:,}"
        raise UsageError(f"make-tiny: {size:,} bytes of weights is beyond a tiny model (limit {limit})")
    shards = plan_shards(checkpoint_tensors(config), weight_dtype.itemsize, max_shard_bytes)
    target = Path(directory)
    _check_target(target, force)

    created = [p for p in (target.parent, *target.parent.parents) if not p.exists()]  # deepest first
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        _write_snapshot(staging, raw, shards, weight_dtype, seed)
        _publish_permissions(staging)
        _move_into_place(staging, target)
    except BaseException as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # leave no empty parents behind either
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            raise OlmoscopeError(f"{target}: cannot write the snapshot ({exc.strerror or exc})") from None
        raise
    return target


def _dtype_name(dtype: Any) -> str:
    if dtype not in DTYPE_ALIASES:
        raise UsageError(f"--dtype {dtype!r} is unsupported (float32/fp32 or bfloat16/bf16)")
    return DTYPE_ALIASES[dtype]


def _check_target(target: Path, force: bool) -> None:
    if target.exists() and not target.is_dir():
        raise UsageError(f"{target}: exists and is not a directory")
    if target.is_dir() and any(target.iterdir()) and not force:
        raise UsageError(f"{target}: directory is not empty; pass --force to replace the snapshot files in it")


def _write_snapshot(
    folder: Path, raw: dict[str, Any], shards: list[list[TensorSpec]], dtype: np.dtype, seed: int
) -> None:
    _write_json(folder / "config.json", raw)
    _write_json(
        folder / "generation_config.json",
        {"_from_model_config": True, "eos_token_id": raw["eos_token_id"], "pad_token_id": raw["pad_token_id"]},
    )
    tokenizer = resources.files("olmoscope").joinpath("data", "dolma2-tokenizer.json")
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    _write_json(folder / "tokenizer_config.json", _tokenizer_config(raw))
    _write_shards(folder, shards, dtype, seed)


def _tokenizer_config(raw: dict[str, Any]) -> dict[str, Any]:
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "model_max_length": raw["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def random_weight(rng: np.random.Generator, spec: TensorSpec, dtype: np.dtype) -> np.ndarray:
    """Matrices ~ N(0, 0.02²); norm weights 1 + N(0, 0.1²); drawn in float32, then cast."""
    draw = rng.standard_normal(spec.shape, dtype=np.float32)
    values = 1.0 + NORM_JITTER * draw if len(spec.shape) == 1 else INIT_STD * draw
    return values.astype(dtype)


def plan_shards(specs: list[TensorSpec], itemsize: int, max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most max_shard_bytes (a bigger tensor gets a shard alone).

    The default limit ends the first shard in the middle of layer 0, as real multi-shard checkpoints do.
    """
    if max_shard_bytes is None:
        layer0 = [i for i, s in enumerate(specs) if s.layer == 0]
        cut = layer0[len(layer0) // 2 - 1] if len(layer0) >= 2 else 0
        max_shard_bytes = sum(s.elements for s in specs[: cut + 1]) * itemsize
    elif isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise UsageError(f"--max-shard-bytes must be a positive integer, found {max_shard_bytes!r}")
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        size = spec.elements * itemsize
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += size
    return shards


def _write_shards(folder: Path, shards: list[list[TensorSpec]], dtype: np.dtype, seed: int) -> None:
    """Draw the weights in natural order (so the seed alone fixes them) and write shards plus the index."""
    rng = np.random.default_rng(seed)
    specs = [s for shard in shards for s in shard]
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        weights = {s.name: random_weight(rng, s, dtype) for s in shard}
        save_file(weights, str(folder / name), metadata={"format": "pt"})  # transformers requires "pt"
        weight_map.update((s.name, name) for s in shard)
    index = {
        "metadata": {"total_size": sum(s.elements for s in specs) * dtype.itemsize},
        "weight_map": weight_map,
    }
    _write_json(folder / "model.safetensors.index.json", index)


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes a private 0700 folder and safetensors writes 0600: give them the user's usual umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.rename(staging, target)
        return
    stale = [target / n for n in SNAPSHOT_FILES] + sorted(target.glob(SHARD_GLOB))
    for path in stale:
        if path.is_file() or path.is_symlink():
            path.unlink()
    for path in sorted(staging.iterdir()):
        os.replace(path, target / path.name)
    staging.rmdir()


# ── the command ─────────────────────────────────────────────────────────────────
@click.command("make-tiny")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--hidden-size", type=int, default=64, show_default=True, help="D, the residual width.")
@click.option("--intermediate-size", type=int, help="I, the SwiGLU width. [default: 8/3·D rounded up to 32]")
@click.option("--layers", "num_layers", type=int, default=2, show_default=True, help="L, transformer blocks.")
@click.option("--heads", "num_heads", type=int, default=4, show_default=True, help="H, query heads.")
@click.option("--kv-heads", "num_kv_heads", type=int, help="Hkv, key/value heads (fewer than H: GQA). [default: H]")
@click.option("--vocab-size", type=int, default=100352, show_default=True,
              help="V, embedding rows; below 100278 the eos/pad ids move to V-1 and V-2.")
@click.option("--max-position-embeddings", type=int, default=4096, show_default=True, help="Trained context length.")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True, help="Weight dtype.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random weights; same seed, same files.")
@click.option("--max-shard-bytes", type=int,
              help="Largest shard. [default: the first shard ends in the middle of layer 0]")
@click.option("--force", is_flag=True,
              help="Write into a non-empty DIR, replacing its snapshot files (config, tokenizer, shards, index).")
def make_tiny_command(directory: str, force: bool, **dims: Any) -> None:
    """Write a small random OLMo 2 snapshot to DIR: config.json, generation_config.json, the real dolma2
    tokenizer.json, tokenizer_config.json with the Instruct chat template, and sharded safetensors with an
    index. transformers' Olmo2ForCausalLM.from_pretrained(DIR) loads it."""
    path = make_tiny(directory, force=force, **dims)
    shards = sorted(path.glob(SHARD_GLOB))
    config = ModelConfig.from_file(path / "config.json")
    click.echo(
        f"wrote {path}: {parameter_count(config):,} parameters, {dims['dtype']}, {len(shards)} shards "
        f"(D {config.hidden_size}, I {config.intermediate_size}, L {config.num_hidden_layers}, "
        f"H {config.num_attention_heads}, Hkv {config.num_key_value_heads}, V {config.vocab_size})"
    )
