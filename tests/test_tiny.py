"""`olmoscope make-tiny`: the snapshot loads in transformers and agrees with what olmoscope reports for it."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from importlib import resources

import numpy as np
import pytest
from click.testing import CliRunner
from jinja2.sandbox import ImmutableSandboxedEnvironment
from safetensors import safe_open

from olmoscope.arch import arch_report
from olmoscope.checkpoint import Checkpoint, check_against_config
from olmoscope.cli import main
from olmoscope.config import ModelConfig
from olmoscope.errors import ConfigError, OlmoscopeError, UsageError
from olmoscope.sources import resolve
from olmoscope.tiny import CHAT_TEMPLATE, make_tiny, tiny_config

SMALL = {"vocab_size": 512}  # keeps snapshots at a few hundred KB; the tokenizer is still the real one

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a prime."},
]
# OLMO2.md, spelled out: <|endoftext|> first, role markers as plain text, assistant turns end <|endoftext|>\n.
EXPECTED_CHAT = (
    "<|endoftext|><|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello!<|endoftext|>\n"
    "<|user|>\nName a prime.\n<|assistant|>\n"
)


def snapshot_tensors(directory) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (shard, shape), read from the index and the shard headers with safetensors."""
    weight_map = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(directory / shard, "np") as f:
            for name in f.keys():
                out[name] = (shard, tuple(f.get_slice(name).get_shape()))
    assert {n: s for n, (s, _) in out.items()} == weight_map
    return out


def file_digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


# ── transformers loads it ───────────────────────────────────────────────────────
@pytest.mark.slow
@pytest.mark.parametrize(
    "heads, kv_heads, dtype",
    [(4, 4, "float32"), (4, 2, "float32"), (4, 4, "bfloat16"), (8, 2, "bfloat16")],
    ids=["mha-fp32", "gqa-fp32", "mha-bf16", "gqa-bf16"],
)
def test_transformers_loads_tiny_snapshot(tmp_path, heads, kv_heads, dtype):
    import torch  # a test dependency (pyproject's test extra): missing it must fail, not skip
    from transformers import Olmo2ForCausalLM

    path = make_tiny(tmp_path / "tiny", num_heads=heads, num_kv_heads=kv_heads, dtype=dtype, **SMALL)
    model, info = Olmo2ForCausalLM.from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and info["error_msgs"] == [], info
    assert model.dtype == getattr(torch, dtype)

    # arch's parameter count is what transformers instantiates
    counted = sum(p.numel() for p in model.parameters())
    assert arch_report(resolve(str(path)))["parameters"]["total"] == counted

    # names and shapes: the snapshot, olmoscope's checkpoint reader and transformers agree
    state = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    stored = {name: shape for name, (_, shape) in snapshot_tensors(path).items()}
    assert stored == state
    checkpoint = Checkpoint.open(path)
    assert {e.name: tuple(e.shape) for e in checkpoint.entries} == state
    config = ModelConfig.from_file(path / "config.json")
    assert check_against_config(checkpoint.entries, config).ok

    # the values transformers loaded are the ones written
    sd = model.state_dict()
    for name, (shard, _) in snapshot_tensors(path).items():
        with safe_open(path / shard, "pt") as f:
            assert torch.equal(f.get_tensor(name), sd[name]), name


@pytest.mark.slow
def test_transformers_tokenizer_renders_olmo2_chat(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(make_tiny(tmp_path / "tiny", **SMALL))
    assert tokenizer("Hello world")["input_ids"] == [9906, 1917]
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert rendered == EXPECTED_CHAT


# ── the snapshot itself ─────────────────────────────────────────────────────────
def test_default_split_puts_a_layer_across_two_shards(tmp_path):
    path = make_tiny(tmp_path / "tiny")  # every default, the full 100,352-row vocabulary included
    tensors = snapshot_tensors(path)
    shards_of_layer = defaultdict(set)
    for name, (shard, _) in tensors.items():
        if name.startswith("model.layers."):
            shards_of_layer[int(name.split(".")[2])].add(shard)
    assert any(len(s) >= 2 for s in shards_of_layer.values()), dict(shards_of_layer)
    assert len({s for s, _ in tensors.values()}) >= 2


def test_index_total_size_is_the_tensor_bytes(tmp_path):
    path = make_tiny(tmp_path / "tiny", dtype="bfloat16", **SMALL)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    total = sum(e.nbytes for e in Checkpoint.open(path).entries)
    assert index["metadata"]["total_size"] == total == 2 * arch_report(resolve(str(path)))["parameters"]["total"]


def test_max_shard_bytes_bounds_every_shard(tmp_path):
    limit = 40_000
    path = make_tiny(tmp_path / "tiny", max_shard_bytes=limit, **SMALL)
    per_shard = defaultdict(list)
    for entry in Checkpoint.open(path).entries:
        per_shard[entry.shard].append(entry.nbytes)
    for shard, sizes in per_shard.items():
        assert sum(sizes) <= limit or len(sizes) == 1, (shard, sizes)  # a bigger tensor gets a shard alone
    assert len(per_shard) > 3


def test_weights_follow_the_documented_distribution(tmp_path):
    path = make_tiny(tmp_path / "tiny", hidden_size=128, **SMALL)
    with safe_open(path / snapshot_tensors(path)["model.layers.0.mlp.up_proj.weight"][0], "np") as f:
        up = f.get_tensor("model.layers.0.mlp.up_proj.weight")
    with safe_open(path / snapshot_tensors(path)["model.norm.weight"][0], "np") as f:
        norm = f.get_tensor("model.norm.weight")
    # std within 10 % of the target (n = 45,056 and 128 draws: far wider than sampling noise)
    assert abs(up.std() / 0.02 - 1) <= 0.1, f"up_proj std {up.std():.4f}"
    assert abs(norm.mean() - 1) <= 0.05 and abs(norm.std() / 0.1 - 1) <= 0.2, (norm.mean(), norm.std())


def test_bf16_is_stored_as_bf16(tmp_path):
    path = make_tiny(tmp_path / "tiny", dtype="bf16", **SMALL)
    assert {e.dtype for e in Checkpoint.open(path).entries} == {"BF16"}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path):
    a = make_tiny(tmp_path / "a", seed=7, **SMALL)
    b = make_tiny(tmp_path / "b", seed=7, **SMALL)
    c = make_tiny(tmp_path / "c", seed=8, **SMALL)
    assert file_digests(a) == file_digests(b)
    differ = {n for n, d in file_digests(a).items() if file_digests(c)[n] != d}
    assert differ and all(n.endswith(".safetensors") for n in differ)


def test_config_is_olmo2_as_released(tmp_path):
    path = make_tiny(tmp_path / "tiny", hidden_size=96, num_heads=6, num_kv_heads=3)
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "olmo2" and raw["architectures"] == ["Olmo2ForCausalLM"]
    assert (raw["rope_theta"], raw["rms_norm_eps"], raw["tie_word_embeddings"]) == (500000, 1e-6, False)
    assert (raw["eos_token_id"], raw["pad_token_id"], raw["vocab_size"]) == (100257, 100277, 100352)
    assert raw["intermediate_size"] == 256  # 8/3·96 = 256
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (100257, 100277)


def test_default_intermediate_size_rounds_up_to_32():
    assert tiny_config()["intermediate_size"] == 192  # 8/3·64 = 170.7 → 192
    assert tiny_config(hidden_size=128)["intermediate_size"] == 352  # 341.3 → 352


def test_small_vocab_keeps_special_ids_inside(tmp_path):
    path = make_tiny(tmp_path / "tiny", **SMALL)
    raw = json.loads((path / "config.json").read_text())
    assert raw["eos_token_id"] == 511 and raw["pad_token_id"] == 510
    generation = json.loads((path / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == (511, 510)


def test_tokenizer_is_the_bundled_dolma2(tmp_path):
    from tokenizers import Tokenizer

    path = make_tiny(tmp_path / "tiny", **SMALL)
    bundled = resources.files("olmoscope").joinpath("data", "dolma2-tokenizer.json").read_bytes()
    assert (path / "tokenizer.json").read_bytes() == bundled
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert tokenizer.encode("Language modeling is ").ids == [14126, 34579, 374, 220]


def test_chat_template_renders_olmo2_instruct_format(tmp_path):
    path = make_tiny(tmp_path / "tiny", **SMALL)
    template = json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    assert template == CHAT_TEMPLATE
    render = ImmutableSandboxedEnvironment().from_string(template).render
    assert render(messages=CONVERSATION, add_generation_prompt=True) == EXPECTED_CHAT
    assert render(messages=CONVERSATION[:3], add_generation_prompt=False) == EXPECTED_CHAT.rsplit("<|user|>", 1)[0]


# ── arguments and the target directory ──────────────────────────────────────────
@pytest.mark.parametrize(
    "options, error, fragment",
    [
        ({"hidden_size": 66, "num_heads": 4}, ConfigError, "not divisible by num_attention_heads"),
        ({"num_heads": 4, "num_kv_heads": 3}, ConfigError, "num_key_value_heads 3"),
        ({"hidden_size": 0}, ConfigError, "hidden_size"),
        ({"num_layers": -1}, ConfigError, "num_hidden_layers"),
        ({"vocab_size": 1 << 30}, ConfigError, "vocab_size"),
        ({"dtype": "float16"}, UsageError, "--dtype"),
        ({"seed": -1}, UsageError, "--seed"),
        ({"max_shard_bytes": 0}, UsageError, "--max-shard-bytes"),
    ],
)
def test_bad_dimensions_are_refused_before_writing(tmp_path, options, error, fragment):
    with pytest.raises(error, match=fragment):
        make_tiny(tmp_path / "tiny", **{**SMALL, **options})
    assert list(tmp_path.iterdir()) == []  # no directory, no staging left behind


def test_non_empty_directory_needs_force(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty"):
        make_tiny(target, **SMALL)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_force_replaces_snapshot_files_and_keeps_others(tmp_path):
    target = tmp_path / "tiny"
    make_tiny(target, max_shard_bytes=20_000, **SMALL)  # many shards
    (target / "notes.txt").write_text("mine")
    make_tiny(target, force=True, num_layers=1, **SMALL)  # fewer shards: the old ones must go
    shards = sorted(p.name for p in target.glob("*.safetensors"))
    assert set(shards) == {s for s, _ in snapshot_tensors(target).values()}
    assert (target / "notes.txt").read_text() == "mine"
    assert check_against_config(Checkpoint.open(target).entries, ModelConfig.from_file(target / "config.json")).ok
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]  # no staging folder left


def test_empty_existing_directory_is_used(tmp_path):
    target = tmp_path / "tiny"
    target.mkdir()
    make_tiny(target, **SMALL)
    assert (target / "model.safetensors.index.json").is_file()


# ── the command ─────────────────────────────────────────────────────────────────
def test_make_tiny_command_writes_a_gqa_bf16_snapshot(tmp_path):
    target = tmp_path / "tiny"
    result = CliRunner().invoke(
        main, ["make-tiny", str(target), "--hidden-size", "128", "--heads", "8", "--kv-heads", "2",
               "--layers", "3", "--vocab-size", "1024", "--dtype", "bf16", "--seed", "3"]
    )
    assert result.exit_code == 0, result.output
    config = ModelConfig.from_file(target / "config.json")
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (128, 8, 2)
    assert (config.num_hidden_layers, config.vocab_size, config.torch_dtype) == (3, 1024, "bfloat16")
    assert f"{arch_report(resolve(str(target)))['parameters']['total']:,} parameters" in result.stdout


def test_make_tiny_command_refuses_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path), "--vocab-size", "512"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"olmoscope: error: {tmp_path}: directory is not empty; pass --force to replace the snapshot files in it"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_make_tiny_command_bad_config_is_one_line(tmp_path):
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "t"), "--hidden-size", "65"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("olmoscope: error: make-tiny: hidden_size 65 is not divisible")
    assert not (tmp_path / "t").exists()


def test_norm_weights_are_not_all_ones(tmp_path):
    path = make_tiny(tmp_path / "tiny", **SMALL)
    ckpt = Checkpoint.open(path)
    norms = [ckpt.read(e.name) for e in ckpt.entries if len(e.shape) == 1]
    assert norms and all(not np.allclose(n, 1.0) for n in norms)


def test_oversized_tiny_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match="beyond a tiny model"):
        make_tiny(tmp_path / "big", hidden_size=8192, num_heads=64, num_layers=64, vocab_size=512)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_target_is_one_line_error(tmp_path):
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["make-tiny", str(tmp_path / "file" / "tiny"), "--vocab-size", "512"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"olmoscope: error: {tmp_path / 'file' / 'tiny'}: cannot write"), line


def test_failure_midway_leaves_nothing_behind(tmp_path, monkeypatch):
    import olmoscope.tiny as tiny

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tiny, "_write_shards", disk_full)
    with pytest.raises(OlmoscopeError, match="No space left on device"):
        make_tiny(tmp_path / "a" / "b" / "tiny", **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither staging nor the parents it created


def test_shard_limit_does_not_change_the_weights(tmp_path):
    a = Checkpoint.open(make_tiny(tmp_path / "a", **SMALL))
    b = Checkpoint.open(make_tiny(tmp_path / "b", max_shard_bytes=10_000, **SMALL))
    assert len(b.shards) > len(a.shards)
    for entry in a.entries:
        assert np.array_equal(a.read(entry.name), b.read(entry.name)), entry.name
