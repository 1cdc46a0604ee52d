"""`olmoscope tensors`: the listing, totals, check, CSV/JSON outputs, grouping, statistics, and bad input."""

from __future__ import annotations

import csv
import io
import json
from importlib import resources

import jsonschema
import ml_dtypes
import numpy as np
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner
from safetensors.numpy import load_file

from olmoscope import tensors as tensors_module
from olmoscope.checkpoint import Checkpoint
from olmoscope.cli import main
from olmoscope.config import ModelConfig
from olmoscope.spec import checkpoint_tensors
from olmoscope.tensors import (
    TensorStats,
    group_rows,
    layer_ranges,
    summary_lines,
    tensor_stats,
)

BROKEN = {  # a snapshot with one tensor missing, one unexpected, one of the wrong shape
    "drop": ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"),
    "extra": {"model.norm.weight": np.ones(65, np.float32), "model.layers.0.input_layernorm.weight": np.ones(64, np.float32)},
}


def run(*args):
    return CliRunner().invoke(main, ["tensors", *map(str, args)])


def report_of(*args) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    schema = json.loads(resources.files("olmoscope.schemas").joinpath("tensors-report.schema.json").read_text())
    jsonschema.validate(report, schema)
    return report


# ── the listing ────────────────────────────────────────────────────────────────


def test_tensors_is_registered_on_the_cli():
    assert "tensors" in main.list_commands(None) and main.get_command(None, "tensors").name == "tensors"


def test_listing_shows_every_tensor_in_natural_order_with_totals_and_ok_check(make_snapshot, tiny_config):
    directory = make_snapshot(shards=2)
    result = run(directory)
    assert result.exit_code == 0, result.output
    names = [t.name for t in checkpoint_tensors(ModelConfig.from_dict(tiny_config))]
    positions = [result.stdout.index(f"{n} ") for n in names]
    assert positions == sorted(positions), "rows are not in natural order"
    assert "by dtype" in result.stdout and "by shard" in result.stdout
    assert "model-00001-of-00002.safetensors" in result.stdout
    assert f"Check against config ({len(names)} tensors implied): ok" in result.stdout


def test_json_report_is_valid_and_matches_the_files(make_snapshot):
    directory = make_snapshot(shards=3, dtype="BF16")
    report = report_of(directory)
    on_disk = {}
    for shard in sorted(directory.glob("*.safetensors")):
        on_disk.update({name: (shard.name, a) for name, a in load_file(shard).items()})
    assert {t["name"] for t in report["tensors"]} == set(on_disk)
    for t in report["tensors"]:
        shard, array = on_disk[t["name"]]
        assert (t["shard"], tuple(t["shape"]), t["dtype"], t["bytes"]) == (shard, array.shape, "BF16", array.nbytes)
    assert report["totals"]["bytes"] == sum(a.nbytes for _, a in on_disk.values())
    assert [d["dtype"] for d in report["totals"]["by_dtype"]] == ["BF16"]
    assert sum(s["tensors"] for s in report["totals"]["by_shard"]) == len(on_disk)
    assert report["check"]["ok"] is True


def test_check_reports_missing_unexpected_wrong_shape_and_exits_1_only_with_check(make_snapshot):
    directory = make_snapshot(**BROKEN)
    plain = run(directory)
    assert plain.exit_code == 0, plain.output
    assert "1 missing, 1 unexpected, 1 wrong shape" in plain.stdout
    assert "model.norm.weight: expected [64], found [65]" in plain.stdout
    strict = run(directory, "--check")
    assert_one_line_error(strict, "check against config failed: 1 missing, 1 unexpected, 1 wrong shape")
    assert strict.exit_code == 1
    assert run(make_snapshot(), "--check").exit_code == 0


def test_json_check_lists_every_finding(make_snapshot):
    check = report_of(make_snapshot(**BROKEN))["check"]
    assert check["missing"] == ["model.layers.1.mlp.up_proj.weight"]
    assert check["unexpected"] == ["model.layers.0.input_layernorm.weight"]
    assert check["wrong_shape"] == [{"name": "model.norm.weight", "expected": [64], "found": [65]}]


def test_filter_narrows_listing_and_totals_but_not_the_check(make_snapshot):
    report = report_of(make_snapshot(**BROKEN), "--filter", r"mlp\.(gate|up)_proj")
    assert [t["name"] for t in report["tensors"]] == [
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"]
    assert report["totals"]["tensors"] == 3 and report["filter"] == r"mlp\.(gate|up)_proj"
    assert len(report["check"]["missing"]) == 1


def test_bad_filter_regex_is_a_one_line_error(make_snapshot):
    assert_one_line_error(run(make_snapshot(), "--filter", "up_proj("), "--filter", "bad regular expression")


def test_group_folds_the_layer_index(make_snapshot):
    result = run(make_snapshot(), "--group")
    assert result.exit_code == 0, result.output
    assert "model.layers.{0-1}.mlp.up_proj.weight" in result.stdout and "×2" in result.stdout
    groups = report_of(make_snapshot(), "--group")["groups"]
    up = next(g for g in groups if g["pattern"] == "model.layers.{0-1}.mlp.up_proj.weight")
    assert (up["count"], up["layers"], up["shape"], up["bytes"]) == (2, [0, 1], [128, 64], 2 * 128 * 64 * 4)
    assert [g["pattern"] for g in groups][0] == "model.embed_tokens.weight"


def test_group_keeps_differing_shapes_apart_and_compacts_ranges(make_snapshot):
    directory = make_snapshot(drop=("model.layers.1.post_attention_layernorm.weight",),
                              extra={"model.layers.1.post_attention_layernorm.weight": np.ones(32, np.float32)})
    patterns = [g.pattern for g in group_rows(Checkpoint.open(directory).entries)]
    assert "model.layers.{0}.post_attention_layernorm.weight" in patterns
    assert "model.layers.{1}.post_attention_layernorm.weight" in patterns
    assert layer_ranges([8, 0, 1, 2, 5, 7]) == "0-2,5,7-8"


# ── CSV ────────────────────────────────────────────────────────────────────────


def test_csv_file_holds_the_listing_and_text_still_prints(make_snapshot, tmp_path):
    target = tmp_path / "out.csv"
    result = run(make_snapshot(shards=2), "--csv", target)
    assert result.exit_code == 0, result.output
    assert "Check against config" in result.stdout
    rows = list(csv.DictReader(target.open()))
    assert rows[0]["name"] == "model.embed_tokens.weight" and rows[0]["shape"] == "[128, 64]"
    assert rows[-1]["name"] == "lm_head.weight" and int(rows[-1]["bytes"]) == 128 * 64 * 4
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_csv_dash_prints_only_csv(make_snapshot):
    result = run(make_snapshot(), "--csv", "-")
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0] == ["name", "shape", "dtype", "elements", "bytes", "shard", "offset"]
    assert len(rows) == 1 + 25


def test_csv_is_not_written_when_the_command_fails(malformed_snapshot, tmp_path):
    directory, _ = malformed_snapshot
    target = tmp_path / "out.csv"
    target.write_text("previous contents\n")
    assert run(directory, "--csv", target).exit_code != 0
    assert target.read_text() == "previous contents\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.csv")) == []


def test_csv_into_a_missing_directory_is_a_one_line_error(make_snapshot, tmp_path):
    assert_one_line_error(run(make_snapshot(), "--csv", tmp_path / "nope" / "out.csv"), "--csv", "cannot write")


def test_group_csv_gives_the_count_as_a_number(make_snapshot):
    result = run(make_snapshot(), "--group", "--csv", "-")
    assert result.exit_code == 0, result.output
    rows = {r["tensor"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    up = rows["model.layers.{0-1}.mlp.up_proj.weight"]
    assert (up["count"], up["elements"]) == ("2", str(2 * 128 * 64))
    assert rows["model.embed_tokens.weight"]["count"] == "1"


def test_json_with_csv_to_stdout_is_a_usage_error(make_snapshot):
    result = run(make_snapshot(), "--json", "--csv", "-")
    assert_one_line_error(result, "--json and --csv -")
    assert result.exit_code == 2


# ── statistics ─────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("dtype", ["F32", "BF16"])
def test_stats_match_numpy_over_the_stored_values(make_snapshot, dtype):
    directory = make_snapshot(dtype=dtype)
    report = report_of(directory, "--stats")
    stored = load_file(directory / "model.safetensors")
    for t in report["tensors"]:
        values = stored[t["name"]].astype(np.float64)
        s = t["stats"]
        assert (s["min"], s["max"], s["nan"], s["inf"]) == (values.min(), values.max(), 0, 0), t["name"]
        assert s["abs_max"] == np.abs(values).max()
        for key, expected in (("mean", values.mean()), ("std", values.std())):
            err = abs(s[key] - expected) / max(abs(expected), 1e-300)
            assert err <= 1e-12, f"{t['name']} {key}: rel err {err:.2e}"


def test_stats_count_nan_and_inf_and_describe_only_finite_values(make_snapshot):
    values = np.array([1.0, np.nan, 3.0, np.inf, -np.inf, np.nan, 2.0], np.float32)
    directory = make_snapshot(extra={"odd": values, "all_nan": np.full(3, np.nan, ml_dtypes.bfloat16)})
    by_name = {t["name"]: t["stats"] for t in report_of(directory, "--stats")["tensors"]}
    assert by_name["odd"] == {"min": 1.0, "max": 3.0, "mean": 2.0, "std": pytest.approx(np.std([1, 2, 3]), rel=1e-15),
                              "abs_max": 3.0, "nan": 2, "inf": 2}
    assert by_name["all_nan"] == {"min": None, "max": None, "mean": None, "std": None, "abs_max": None, "nan": 3, "inf": 0}


def test_chunked_stats_stay_accurate_when_mean_dwarfs_std(monkeypatch):
    monkeypatch.setattr(tensors_module, "STATS_CHUNK_ELEMENTS", 7)  # many merges
    values = 1e4 + np.random.default_rng(1).standard_normal(1000) * 1e-3
    stats = tensor_stats(values).to_dict()
    err = abs(stats["std"] - values.std()) / values.std()
    assert err <= 1e-6, f"std rel err {err:.2e}"
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-15)


def test_group_stats_merge_their_tensors(make_snapshot):
    directory = make_snapshot()
    groups = report_of(directory, "--group", "--stats")["groups"]
    up = next(g for g in groups if g["pattern"] == "model.layers.{0-1}.mlp.up_proj.weight")
    stored = load_file(directory / "model.safetensors")
    both = np.concatenate([stored[f"model.layers.{i}.mlp.up_proj.weight"].ravel() for i in (0, 1)]).astype(np.float64)
    err = abs(up["stats"]["std"] - both.std()) / both.std()
    assert err <= 1e-12, f"std rel err {err:.2e}"
    assert up["stats"]["max"] == both.max()


def test_stats_progress_bar_stays_off_when_stderr_is_not_a_terminal(make_snapshot):
    result = run(make_snapshot(), "--stats")
    assert result.exit_code == 0 and result.stderr == ""
    assert "abs_max" in result.stdout


def test_tensor_stats_of_empty_and_merge_of_nothing_are_none():
    assert TensorStats().to_dict()["mean"] is None
    assert tensor_stats(np.zeros((0, 3), np.float32)).to_dict() == TensorStats().to_dict()


# ── sources and bad input ─────────────────────────────────────────────────────


def test_preset_has_no_tensors_and_says_so():
    assert_one_line_error(run("olmo2-7b"), "olmo2-7b", "a preset is a config without tensors")


def test_config_json_path_lists_the_shards_beside_it(make_snapshot):
    directory = make_snapshot()
    assert report_of(directory / "config.json")["totals"]["tensors"] == 25


def test_missing_path_is_a_one_line_error(tmp_path):
    assert_one_line_error(run(tmp_path / "nowhere"), "nowhere")


def test_every_malformed_input_is_one_line_on_stderr(malformed_snapshot):
    directory, fragments = malformed_snapshot
    result = run(directory)
    assert_one_line_error(result, *fragments)
    assert result.stdout == ""


def test_control_character_names_print_escaped_but_json_keeps_them(make_snapshot):
    name = "model.evil\x1b[2J\nname"
    directory = make_snapshot(extra={name: np.ones(2, np.float32)})
    text = run(directory).stdout
    assert "\x1b" not in text and "model.evil\\x1b[2J\\nname" in text
    assert "model.evil\\x1b[2J\\nname" in run(directory, "--csv", "-").stdout
    assert name in [t["name"] for t in report_of(directory)["tensors"]]


def test_summary_lines_give_shards_tensors_bytes_and_check(make_snapshot):
    lines = summary_lines(str(make_snapshot(shards=2)))
    assert lines[0].startswith("2 shards, 25 tensors, ") and "F32 ×25" in lines[0]
    assert lines[1] == "check against config: ok"


def test_summary_of_a_one_file_source_says_one_shard(make_snapshot):
    lines = summary_lines(str(make_snapshot(shards=1)))
    assert lines[0].startswith("1 shard, 25 tensors, "), lines[0]
