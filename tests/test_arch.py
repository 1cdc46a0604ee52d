"""`olmoscope arch`: the numbers a config implies, checked against the released models and hand formulas."""

from __future__ import annotations

import csv
import io
import json
from importlib import resources

import jsonschema
import pytest
from cli_checks import assert_one_line_error
from click.testing import CliRunner

from olmoscope.arch import arch_report, summary_lines
from olmoscope.cli import main
from olmoscope.errors import UsageError
from olmoscope.sources import resolve

RELEASED_TOTALS = {
    "olmo2-1b": 1_484_916_736,
    "olmo2-7b": 7_298_617_344,
    "olmo2-13b": 13_716_198_400,
    "olmo2-32b": 32_234_279_936,
}

OLMO2_7B_CONFIG = json.loads(resources.files("olmoscope").joinpath("data", "presets", "olmo2-7b.json").read_text())


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def write_config(tmp_path, **changes):
    raw = dict(OLMO2_7B_CONFIG, **changes)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    return path


def assert_arch_error(result, exit_code: int, *fragments: str):
    assert_one_line_error(result, *fragments, exit_code=exit_code)


def arch_schema():
    return json.loads(resources.files("olmoscope.schemas").joinpath("arch-report.schema.json").read_text())


def matmul_params_by_hand(c: dict) -> int:
    """Every Linear weight: L·(2·D·H·d + 2·D·Hkv·d + 3·D·I) + V·D (lm_head); not the embedding, not norms."""
    D, I, L, H, Hkv, V = (c[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "vocab_size"))
    d = D // H
    return L * (2 * D * H * d + 2 * D * Hkv * d + 3 * D * I) + V * D


# ── parameters ──────────────────────────────────────────────────────────────────
@pytest.mark.parametrize("preset", sorted(RELEASED_TOTALS))
def test_parameter_total_equals_released_model(preset):
    params = arch_report(preset)["parameters"]
    assert params["total"] == RELEASED_TOTALS[preset]
    assert sum(c["total"] for c in params["components"]) == RELEASED_TOTALS[preset]


@pytest.mark.parametrize("preset", sorted(RELEASED_TOTALS))
def test_text_output_shows_exact_and_human_totals(preset):
    result = run("arch", preset)
    assert result.exit_code == 0, result.output
    total = RELEASED_TOTALS[preset]
    assert f"{total:,}" in result.stdout
    assert f"{total / 1e9:.2f} B" in result.stdout
    for title in ("Overview", "Parameters by component", "Memory", "Compute", "Decode roofline", "Tensors"):
        assert title in result.stdout
    assert "post-norm inside the residual" in result.stdout and "rotate-half (NeoX)" in result.stdout


def test_per_layer_components_sum_to_one_layer():
    params = arch_report("olmo2-13b")["parameters"]
    layer = [c for c in params["components"] if c["scope"] == "layer"]
    assert len(layer) == 11
    assert sum(c["per_layer"] for c in layer) == params["per_layer"]
    assert params["layers_total"] == 40 * params["per_layer"]


# ── GQA shapes ──────────────────────────────────────────────────────────────────
def test_gqa_tensors_are_kv_width_for_32b():
    report = arch_report("olmo2-32b")
    shapes = {t["role"]: t["shape"] for t in report["tensors"]}
    assert shapes["q_proj"] == [5120, 5120]
    assert shapes["k_proj"] == [1024, 5120]
    assert shapes["v_proj"] == [1024, 5120]
    assert shapes["k_norm"] == [1024]
    assert shapes["q_norm"] == [5120]
    assert shapes["o_proj"] == [5120, 5120]
    overview = report["overview"]
    assert (overview["head_dim"], overview["queries_per_kv_head"], overview["attention"]) == (128, 5, "GQA")
    assert (overview["q_norm_width"], overview["k_norm_width"]) == (5120, 1024)


def test_tensor_table_shows_one_layer_repeated():
    rows = arch_report("olmo2-7b")["tensors"]
    assert len(rows) == 3 + 11
    layer_rows = [r for r in rows if r["scope"] == "layer"]
    assert all(r["repeat"] == 32 and r["tensor"].startswith("model.layers.{l}.") for r in layer_rows)
    assert sum(r["total_parameters"] for r in rows) == RELEASED_TOTALS["olmo2-7b"]
    k_proj = next(r for r in rows if r["role"] == "k_proj")
    assert k_proj["formula"] == "Hkv·d × D"


# ── memory ──────────────────────────────────────────────────────────────────────
def test_kv_cache_bytes_follow_the_formula_for_7b():
    kv = arch_report("olmo2-7b", context=1000, batch=3)["memory"]["kv_cache"]
    per_token_bf16 = 2 * 32 * 32 * 128 * 2  # 2·L·Hkv·d·bytes
    assert per_token_bf16 == 524_288
    assert kv["bytes_per_token"] == {"bf16": 524_288, "fp32": 1_048_576}
    assert kv["bytes"] == {"bf16": 524_288 * 1000 * 3, "fp32": 1_048_576 * 1000 * 3}


def test_kv_cache_uses_kv_heads_for_32b():
    kv = arch_report("olmo2-32b")["memory"]["kv_cache"]
    assert kv["bytes_per_token"]["bf16"] == 2 * 64 * 8 * 128 * 2
    assert kv["context"] == 4096  # max_position_embeddings by default
    assert kv["bytes"]["bf16"] == 262_144 * 4096


def test_weight_bytes_per_format():
    report = arch_report("olmo2-7b")
    weights = {w["format"]: w["bytes"] for w in report["memory"]["weights"]}
    P = RELEASED_TOTALS["olmo2-7b"]
    assert weights["fp32"] == 4 * P
    assert weights["bf16"] == weights["fp16"] == 2 * P
    norms = 32 * (4096 + 4096 + 2 * 4096) + 4096
    table = 100352 * 4096  # the embedding, and lm_head of the same shape: bf16 in int8 and int4 files
    layers = P - norms - 2 * table
    # rows of every quantized matrix: lm_head V; per layer q,k,v,o 4·D, gate,up I each, down D.
    layer_rows = 32 * (4 * 4096 + 2 * 11008 + 4096)
    assert weights["int8"] == 2 * table + (table + layers) + 4 * (100352 + layer_rows) + 4 * norms
    # every layer matrix has 4096 or 11008 input columns: whole groups of 128 (11008 = 86·128); each group
    # an fp16 scale and a one-byte zero point (asym, convert's default)
    groups = 32 * (4 * 4096 * 4096 + 2 * 11008 * 4096 + 4096 * 11008) // 128
    assert weights["int4"] == 2 * 2 * table + layers // 2 + (2 + 1) * groups + 4 * norms


def test_serving_total_is_bf16_weights_plus_kv_cache():
    memory = arch_report("olmo2-1b", context=2048, batch=4)["memory"]
    one, batch = memory["serving"]
    kv_token = 2 * 16 * 16 * 128 * 2
    assert one == {
        "sequences": 1,
        "context": 2048,
        "weights_bytes": 2 * RELEASED_TOTALS["olmo2-1b"],
        "kv_cache_bytes": kv_token * 2048,
        "total_bytes": 2 * RELEASED_TOTALS["olmo2-1b"] + kv_token * 2048,
    }
    assert batch["sequences"] == 4 and batch["kv_cache_bytes"] == 4 * kv_token * 2048


# ── compute and roofline ────────────────────────────────────────────────────────
def test_decode_flops_count_matmuls_and_attention():
    decode = arch_report("olmo2-7b", context=4096)["compute"]["decode"]
    matmul = 2 * matmul_params_by_hand(OLMO2_7B_CONFIG)
    attention = 4 * 32 * 32 * 128 * 4096  # 4·L·H·d·ctx
    assert decode["matmul_flops"] == matmul == 2 * 6_887_047_168
    assert decode["attention_flops"] == attention
    assert decode["flops_per_token"] == matmul + attention


def test_prefill_attention_is_causal():
    prefill = arch_report("olmo2-7b", context=4096, prefill=100)["compute"]["prefill"]
    assert prefill["tokens"] == 100
    assert prefill["matmul_flops"] == 100 * 2 * matmul_params_by_hand(OLMO2_7B_CONFIG)
    assert prefill["attention_flops"] == 4 * 32 * 32 * 128 * (100 * 101 // 2)
    default = arch_report("olmo2-7b", context=512)["compute"]["prefill"]
    assert default["tokens"] == 512  # the context by default


def test_roofline_is_bandwidth_over_bytes_read():
    report = arch_report("olmo2-7b", context=1024, bandwidth=1000)
    roofline = report["roofline"]
    norms = 32 * 4 * 4096 + 4096
    weights_read = 2 * (matmul_params_by_hand(OLMO2_7B_CONFIG) + norms + 4096)  # one embedding row
    kv_read = 524_288 * 1024
    assert roofline["weights_bytes_read"] == weights_read
    assert roofline["bytes_per_token"] == weights_read + kv_read
    (gpu,) = roofline["gpus"]
    expected = 1000e9 / (weights_read + kv_read)
    rel = abs(gpu["tokens_per_s"] - expected) / expected
    assert rel <= 1e-12, f"rel err {rel:.2e}"


def test_roofline_names_datasheet_gpus():
    gpus = {g["gpu"]: g for g in arch_report("olmo2-32b")["roofline"]["gpus"]}
    assert {n: g["bandwidth_gb_s"] for n, g in gpus.items()} == {
        "H100 SXM": 3350, "H200": 4800, "A100 80GB": 2039, "RTX 4090": 1008,
    }
    assert gpus["RTX 4090"]["fits"] is False and gpus["H200"]["fits"] is True


def test_tied_embeddings_head_reads_the_embedding(tmp_path):
    report = arch_report(resolve(str(write_config(tmp_path, tie_word_embeddings=True))))
    params = report["parameters"]
    assert params["total"] == RELEASED_TOTALS["olmo2-7b"] - 100352 * 4096
    assert "lm_head" not in {c["component"] for c in params["components"]}
    assert params["matmul"] == matmul_params_by_hand(OLMO2_7B_CONFIG)  # the head still multiplies V·D
    assert any("tied" in note for note in report["notes"])


# ── JSON and CSV ────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "args", [["olmo2-1b"], ["olmo2-32b", "--context", "100", "--batch", "8", "--bandwidth", "900"]]
)
def test_json_report_is_valid_against_schema(args):
    result = run("arch", *args, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    jsonschema.validate(report, arch_schema(), cls=jsonschema.Draft202012Validator)
    assert report == json.loads(json.dumps(arch_report(args[0], **_options(args[1:]))))


def _options(args):
    names = {"--context": "context", "--batch": "batch", "--bandwidth": "bandwidth"}
    pairs = dict(zip(args[::2], args[1::2]))
    return {names[k]: (float(v) if k == "--bandwidth" else int(v)) for k, v in pairs.items()}


def test_schema_rejects_a_report_missing_a_section():
    report = json.loads(json.dumps(arch_report("olmo2-1b")))
    del report["roofline"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(report, arch_schema(), cls=jsonschema.Draft202012Validator)


def test_csv_file_holds_the_tensor_table(tmp_path):
    out = tmp_path / "tensors.csv"
    result = run("arch", "olmo2-32b", "--csv", str(out))
    assert result.exit_code == 0, result.output
    assert "Overview" in result.stdout  # a FILE does not replace the tables
    rows = list(csv.DictReader(out.open(newline="")))
    assert len(rows) == 14
    k_proj = next(r for r in rows if r["role"] == "k_proj")
    assert (k_proj["shape"], k_proj["repeat"], k_proj["parameters"]) == ("1024x5120", "64", str(1024 * 5120))
    assert sum(int(r["total_parameters"]) for r in rows) == RELEASED_TOTALS["olmo2-32b"]


def test_csv_dash_writes_only_csv_to_stdout():
    result = run("arch", "olmo2-1b", "--csv", "-")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows[0]["tensor"] == "model.embed_tokens.weight" and len(rows) == 14


def test_csv_is_not_written_when_options_are_bad(tmp_path):
    out = tmp_path / "tensors.csv"
    result = run("arch", "olmo2-1b", "--context", "0", "--csv", str(out))
    assert_arch_error(result, 2, "--context")
    assert list(tmp_path.iterdir()) == []


def test_csv_into_missing_folder_is_one_line_error(tmp_path):
    result = run("arch", "olmo2-1b", "--csv", str(tmp_path / "no" / "such" / "t.csv"))
    assert_arch_error(result, 2, "--csv", "t.csv")
    assert list(tmp_path.iterdir()) == []


# ── bad input ───────────────────────────────────────────────────────────────────
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--context", "0"], "--context"),
        (["--context", "-5"], "--context"),
        (["--context", str(1 << 30)], "--context"),
        (["--batch", "0"], "--batch"),
        (["--batch", "1000000"], "--batch"),
        (["--prefill", "0"], "--prefill"),
        (["--bandwidth", "0"], "--bandwidth"),
        (["--bandwidth", "nan"], "--bandwidth"),
        (["--bandwidth", "-3"], "--bandwidth"),
        (["--json", "--csv", "-"], "stdout"),
    ],
)
def test_bad_options_are_one_line_errors(args, fragment):
    assert_arch_error(run("arch", "olmo2-7b", *args), 2, fragment)


def test_bad_option_raises_usage_error_from_the_function():
    with pytest.raises(UsageError, match="--batch"):
        arch_report("olmo2-7b", batch=0)


def test_non_olmo_config_is_named(tmp_path):
    path = write_config(tmp_path, model_type="llama", architectures=["LlamaForCausalLM"])
    assert_arch_error(run("arch", str(path)), 1, "llama", "config.json")


def test_inconsistent_config_is_named(tmp_path):
    path = write_config(tmp_path, hidden_size=4000, num_attention_heads=48)
    assert_arch_error(run("arch", str(tmp_path)), 1, "hidden_size 4000", "num_attention_heads 48", str(path))


def test_missing_source_is_one_line_error(tmp_path):
    assert_arch_error(run("arch", str(tmp_path / "nothing")), 1, "nothing")


def test_auto_map_is_noted_on_stderr(tmp_path):
    write_config(tmp_path, auto_map={"AutoModelForCausalLM": "modeling.Evil"})
    result = run("arch", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    assert "olmoscope: note: " in result.stderr and "auto_map is ignored" in result.stderr
    report = json.loads(result.stdout)  # stdout stays pure JSON; the note is also in the report
    assert any("auto_map is ignored" in note for note in report["notes"])


def test_context_beyond_training_is_noted():
    result = run("arch", "olmo2-1b", "--context", "8192")
    assert result.exit_code == 0, result.output
    assert "beyond the trained context" in result.stderr


def test_help_names_every_option():
    result = run("arch", "--help")
    assert result.exit_code == 0
    for option in ("--context", "--batch", "--prefill", "--bandwidth", "--json", "--csv", "preset"):
        assert option in result.stdout


# ── summary for other commands ──────────────────────────────────────────────────
def test_summary_lines_give_params_dims_and_bf16_size():
    lines = summary_lines("olmo2-7b")
    assert 2 <= len(lines) <= 5
    text = "\n".join(lines)
    assert "7,298,617,344" in text and "7.30 B" in text
    assert "32 layers" in text and "hidden 4096" in text
    assert f"{2 * RELEASED_TOTALS['olmo2-7b']:,}" in text


def test_largest_allowed_options_are_accepted():
    report = arch_report("olmo2-7b", context=1 << 24, batch=1 << 16, prefill=1 << 24, bandwidth=100_000)
    assert report["memory"]["kv_cache"]["bytes"]["bf16"] == 524_288 * (1 << 24) * (1 << 16)
    assert any("--context 16,777,216 is beyond the trained context" in n for n in report["notes"])


@pytest.mark.parametrize("command", ["arch", "tensors"])
def test_a_report_path_with_a_trailing_slash_is_refused_not_written_as_a_file(tmp_path, monkeypatch, command):
    """Issue 10, item 11: `-o dir/` once wrote a file named `dir`; the same writer serves --csv."""
    monkeypatch.chdir(tmp_path)
    source = "olmo2-1b" if command == "arch" else None
    if source is None:
        from olmoscope.tiny import make_tiny

        source = str(make_tiny(tmp_path / "snap", hidden_size=32, num_layers=1, num_heads=2, vocab_size=256))
    result = CliRunner().invoke(main, [command, source, "--csv", "report/"])
    assert_one_line_error(result, "--csv report/: names a directory (trailing slash)")
    assert not (tmp_path / "report").exists()
