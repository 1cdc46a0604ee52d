"""SOURCE resolution: snapshot directories, config.json paths, repo ids from the local Hugging Face cache
(offline, HF_HUB_CACHE / HF_HOME honoured, @revision), presets, and the config checks behind all of them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from olmoscope import convert as cv
from olmoscope import engine_format as ef
from olmoscope.cli import main
from olmoscope.errors import ConfigError, SourceError
from olmoscope.sources import PRESETS, resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def run(*args):
    return CliRunner().invoke(main, list(map(str, args)))


def cache_repo(cache: Path, repo_id: str, snapshot: Path, commit: str = COMMIT, refs=("main",)) -> Path:
    """Lay a snapshot out as huggingface_hub does: blobs, snapshots/<commit>/ of symlinks, refs/<branch>."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    folder = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True)
    for i, file in enumerate(sorted(snapshot.iterdir())):
        blob = repo / "blobs" / f"{commit[:8]}{i:04d}"
        shutil.copyfile(file, blob)
        (folder / file.name).symlink_to(os.path.relpath(blob, folder))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty hub cache in HF_HUB_CACHE, with the network pointed at a closed port (offline must not matter)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HOME", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    return cache


# ── repo ids from the local cache ──────────────────────────────────────────────


def test_repo_id_resolves_from_the_hub_cache(hub_cache, make_snapshot):
    folder = cache_repo(hub_cache, "org/name", make_snapshot())
    source = resolve("org/name")
    assert (source.kind, source.repo_id, source.revision) == ("hub", "org/name", None)
    assert source.directory == folder and source.config_path == folder / "config.json"
    assert source.config.hidden_size == 64


def test_repo_id_at_branch_and_at_commit_resolve_to_that_snapshot(hub_cache, make_snapshot, tiny_config):
    cache_repo(hub_cache, "org/name", make_snapshot(), refs=("main",))
    other = cache_repo(hub_cache, "org/name", make_snapshot(config={**tiny_config, "num_hidden_layers": 1}),
                       commit=OTHER_COMMIT, refs=("v1",))
    assert resolve("org/name").config.num_hidden_layers == 2
    at_branch = resolve("org/name@v1")
    assert (at_branch.directory, at_branch.revision, at_branch.config.num_hidden_layers) == (other, "v1", 1)
    assert resolve(f"org/name@{OTHER_COMMIT}").directory == other
    assert resolve(f"org/name@{COMMIT}").config.num_hidden_layers == 2


def test_hf_home_is_used_when_hub_cache_is_unset(tmp_path, monkeypatch, make_snapshot):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    folder = cache_repo(tmp_path / "hf-home" / "hub", "org/name", make_snapshot())
    assert resolve("org/name").directory == folder


@pytest.mark.parametrize("label,command", [
    ("org/missing", "hf download org/missing"),
    ("org/name@v9", "hf download org/name --revision v9"),
    (f"org/name@{OTHER_COMMIT}", f"hf download org/name --revision {OTHER_COMMIT}"),
])
def test_uncached_repo_says_so_and_prints_the_exact_download_command(hub_cache, make_snapshot, label, command):
    cache_repo(hub_cache, "org/name", make_snapshot())
    for cmd in ("arch", "tensors", "convert"):
        extra = ("-o", hub_cache.parent / "x.engine") if cmd == "convert" else ()
        result = run(cmd, label, *extra)
        assert_one_line_error(result, label, "not in the local Hugging Face cache", str(hub_cache))
        assert result.stderr.rstrip().endswith(command), result.stderr
    assert not (hub_cache.parent / "x.engine").exists()


def test_revision_that_climbs_out_of_refs_is_refused(hub_cache, make_snapshot):
    cache_repo(hub_cache, "org/name", make_snapshot())
    (hub_cache / "escape").write_text(COMMIT)  # refs/../../escape would name a real commit
    with pytest.raises(SourceError, match="not a valid branch, tag or commit"):
        resolve("org/name@../../escape")


def test_arch_and_tensors_of_a_cached_repo_read_through_the_cache_symlinks(hub_cache, make_snapshot):
    folder = cache_repo(hub_cache, "org/name", make_snapshot(shards=2))
    arch = run("arch", "org/name@main", "--json")
    assert arch.exit_code == 0, arch.output
    assert json.loads(arch.stdout)["source"] == {
        "label": "org/name@main", "kind": "hub", "repo_id": "org/name", "revision": "main",
        "path": str(folder / "config.json"),
    }
    tensors = run("tensors", "org/name", "--check", "--json")
    assert tensors.exit_code == 0, tensors.output
    report = json.loads(tensors.stdout)
    assert report["check"]["ok"] and len(report["tensors"]) == 25
    assert {t["shard"] for t in report["tensors"]} == {"model-00001-of-00002.safetensors",
                                                       "model-00002-of-00002.safetensors"}


def test_convert_of_a_cached_repo_records_repo_revision_and_commit(hub_cache, make_snapshot, tmp_path):
    cache_repo(hub_cache, "org/name", make_snapshot())
    out = tmp_path / "m.engine"
    cv.convert("org/name@main", out)
    with ef.EngineFile.open(out) as engine:
        p = engine.provenance
    assert (p["source"], p["repo_id"], p["revision"], p["commit"]) == ("org/name@main", "org/name", "main", COMMIT)


def test_a_local_path_wins_over_a_repo_id_of_the_same_spelling(hub_cache, make_snapshot, tmp_path, monkeypatch):
    cache_repo(hub_cache, "org/name", make_snapshot())
    local = tmp_path / "work" / "org" / "name"
    shutil.copytree(make_snapshot(), local)
    monkeypatch.chdir(tmp_path / "work")
    source = resolve("org/name")
    assert source.kind == "snapshot" and source.directory == Path("org/name")


# ── paths and presets ───────────────────────────────────────────────────────────


def test_config_json_path_is_a_source_with_its_folder_as_the_snapshot(make_snapshot):
    snapshot = make_snapshot()
    source = resolve(str(snapshot / "config.json"))
    assert (source.kind, source.directory, source.config_path) == ("config", snapshot, snapshot / "config.json")
    result = run("arch", snapshot / "config.json")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_need_no_files_and_name_their_repo(preset):
    source = resolve(preset)
    assert source.kind == "preset" and source.directory is None and source.repo_id == PRESETS[preset]


def test_auto_map_is_noted_as_ignored_by_tensors_convert_and_verify_too(make_snapshot, tiny_config, tmp_path):
    snapshot = make_snapshot(config={**tiny_config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}})
    engine = tmp_path / "m.engine"
    for args in (("tensors", snapshot), ("convert", snapshot, "-o", engine), ("verify", engine, "--against", snapshot)):
        result = run(*args)
        assert result.exit_code == 0, result.output
        assert "olmoscope: note: " in result.stderr and "auto_map is ignored" in result.stderr


def test_a_device_or_fifo_is_refused_without_being_opened(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it for reading would block forever
    with pytest.raises(SourceError, match="not a regular file or a directory"):
        resolve(str(fifo))
    assert_one_line_error(run("arch", "/dev/null"), "/dev/null", "not a regular file")


def test_snapshot_without_config_json_is_named(tmp_path):
    assert_one_line_error(run("tensors", tmp_path), "no config.json in", str(tmp_path))


def test_a_config_json_that_is_a_fifo_or_dangling_link_is_named_not_missing(tmp_path):
    os.mkfifo(tmp_path / "config.json")
    assert_one_line_error(run("arch", tmp_path), "config.json: not a regular file (a FIFO)")
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").symlink_to(tmp_path / "gone.json")
    assert_one_line_error(run("arch", tmp_path), "config.json: no such file (a dangling symbolic link)")


def test_a_safetensors_file_is_read_with_the_config_json_beside_it(make_snapshot, tmp_path):
    """Issue 10: a single .safetensors SOURCE once said "invalid JSON"."""
    snapshot = make_snapshot()
    shard = snapshot / "model.safetensors"
    source = resolve(str(shard))
    assert source.kind == "snapshot" and source.directory == snapshot
    assert any("reading its snapshot directory" in note for note in source.notes)
    listing = run("tensors", shard)
    assert listing.exit_code == 0 and "model.norm.weight" in listing.stdout, listing.output
    cv.convert(str(shard), tmp_path / "m.engine")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(shard, alone / "weights.safetensors")
    assert_one_line_error(run("arch", alone / "weights.safetensors"),
                          "a safetensors file is read with the config.json beside it")


# ── config validation (every SOURCE goes through it) ───────────────────────────


@pytest.mark.parametrize("change,fragment", [
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, "model_type 'llama'"),
    ({"architectures": ["Olmo2Model", "Evil"]}, "architectures"),
    ({"vocab_size": None}, "vocab_size must be an integer"),
    ({"hidden_size": 0}, "hidden_size must be positive"),
    ({"num_hidden_layers": -2}, "num_hidden_layers must be positive"),
    ({"intermediate_size": 12.5}, "intermediate_size must be an integer"),
    ({"hidden_size": 1 << 20}, "hidden_size 1,048,576 is beyond any sane OLMo 2"),
    ({"vocab_size": 10**12}, "vocab_size 1,000,000,000,000 is beyond"),
    ({"hidden_size": 66}, "hidden_size 66 is not divisible by num_attention_heads 4"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ({"hidden_size": 12}, "head_dim 3 is odd"),
    ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
    ({"rope_theta": float("inf")}, "rope_theta must be a positive number"),
    ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, found 'false'"),
    ({"attention_bias": "no"}, "attention_bias must be true or false"),
    ({"head_dim": 32}, "head_dim 32 differs from hidden_size / num_attention_heads = 64 / 4 = 16"),
    ({"head_dim": "16"}, "head_dim must be an integer"),
    ({"model_type": "x" * 10_000}, "model_type 'xxxxxxxx"),  # a huge value is cut, not printed whole
])
def test_bad_config_values_are_one_line_naming_the_field(tmp_path, tiny_config, change, fragment):
    raw = {**tiny_config, **change}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="config.json") as caught:
        resolve(str(tmp_path))
    assert fragment in str(caught.value), str(caught.value)
    assert len(str(caught.value)) < 400, "a value from the file must be cut, not printed whole"
    assert_one_line_error(run("arch", tmp_path), fragment)


def test_an_explicit_head_dim_of_d_over_h_is_accepted(tmp_path, tiny_config):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config, "head_dim": 16, "tie_word_embeddings": None}))
    assert resolve(str(tmp_path)).config.head_dim == 16


def test_missing_required_field_is_named(tmp_path, tiny_config):
    del tiny_config["intermediate_size"]
    (tmp_path / "config.json").write_text(json.dumps(tiny_config))
    assert_one_line_error(run("arch", tmp_path), "required field 'intermediate_size' is missing")


@pytest.mark.parametrize("text,fragment", [
    ("{", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"model_type": "olmo2\xff"}', "not UTF-8 text"),  # written as latin-1: not UTF-8
    (" " * (1 << 20) + "{}", "1,048,578 bytes is over the 1,048,576-byte limit"),
    ('{"model_type": "olmo2", "model_type": "olmo2"}', "duplicate key 'model_type'"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "an integer of 5,000 digits"),
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 64 levels"),
    ('{"model_type": "olmo2", "torch_dtype": "\\ud800"}', "lone surrogate (\\ud800)"),
])
def test_unreadable_config_json_is_one_line(tmp_path, text, fragment):
    (tmp_path / "config.json").write_text(text, encoding="latin-1")
    assert_one_line_error(run("arch", tmp_path / "config.json"), fragment, "config.json")
