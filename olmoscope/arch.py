"""`olmoscope arch`: what a config implies — parameters, memory, compute, decode roofline, tensor table.

The report is plain data (`arch_report`), valid against schemas/arch-report.schema.json; the command
renders it as tables, JSON or CSV. Only the config is read, so presets, snapshots and engines all work.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from typing import Any

import click
from tabulate import tabulate

from olmoscope.atomic import write_text_atomically
from olmoscope.config import ModelConfig
from olmoscope.errors import UsageError
from olmoscope.sources import SOURCE_HELP, Source, resolve
from olmoscope.spec import ROLE_DESCRIPTIONS, TensorSpec, checkpoint_tensors, engine_tensors
from olmoscope.weight_formats import ELEMENT_BITS, FORMATS, INT4_DEFAULT_GROUP, INT4_DEFAULT_SCHEME, NORM_DTYPE

REPORT_VERSION = 1

# Bounds on the what-if options: far beyond any real deployment, small enough to stay meaningful.
MAX_CONTEXT = 1 << 24
MAX_BATCH = 1 << 16
MAX_BANDWIDTH_GB_S = 100_000.0

# Datasheet figures: (name, memory bandwidth GB/s, memory GB).
GPUS: tuple[tuple[str, float, float], ...] = (
    ("H100 SXM", 3350.0, 80.0),
    ("H200", 4800.0, 141.0),
    ("A100 80GB", 2039.0, 80.0),
    ("RTX 4090", 1008.0, 24.0),
)

ROPE_TYPE = "rotate-half (NeoX)"
NORM_PLACEMENT = "post-norm inside the residual"
QUANT_NOTE = (
    "int8 and int4 are the sizes of the engine files `convert --dtype int8|int4` writes with its defaults: the "
    f"embedding stays bf16; int8 quantizes lm_head too, int4 keeps it bf16 (--int4-lm-head quantizes it) and "
    f"stores {INT4_DEFAULT_SCHEME} groups of {INT4_DEFAULT_GROUP} (an fp16 scale and a 4-bit zero point each); "
    "norm weights stay fp32"
)

WEIGHT_FORMATS = {
    "fp32": "every tensor 4 bytes per element",
    "bf16": "every tensor 2 bytes per element",
    "fp16": "every tensor 2 bytes per element",
    "int8": "matrices 1 byte/element + one fp32 scale per row; embedding bf16, norms fp32",
    "int4": f"matrices 2 elements/byte + per {INT4_DEFAULT_GROUP} inputs of a row an fp16 scale and a zero point; "
            f"embedding and lm_head bf16, norms fp32",
}

FLOPS_COUNTED = (
    "1 multiply-add = 2 FLOPs. Counted: every matmul (q/k/v/o, gate/up/down, lm_head) as 2·params per token, "
    "and attention scores q·kᵀ plus the weighted sum of v as 4·L·H·d per attended position. "
    "Not counted: the embedding gather (not a matmul), RMSNorms, RoPE, softmax, SiLU and residual adds "
    "(elementwise, O(D) per token)."
)
PREFILL_COUNTED = (
    "causal attention: prompt token i attends to i positions, so attention costs 4·L·H·d·N(N+1)/2 "
    "(≈ half of full N² attention); lm_head counted for every prompt token, as transformers computes it"
)
ROOFLINE_NOTE = (
    "Ceiling for batch 1: bandwidth / bytes read per token. Bytes read: bf16 weights of every matmul and "
    "norm, one embedding row (a gather, not the whole table), and the bf16 KV cache at the context. "
    "Ignores compute, kernel launches and caches; fits = bf16 weights + KV cache ≤ datasheet memory."
)
SYMBOL_TEXT = {"V": "V", "D": "D", "I": "I", "Hd": "H·d", "Hkvd": "Hkv·d"}


# ── the report, as data ─────────────────────────────────────────────────────────
def arch_report(
    source: Source | str,
    context: int | None = None,
    batch: int = 1,
    bandwidth: float | None = None,
    prefill: int | None = None,
) -> dict[str, Any]:
    """Everything `olmoscope arch` shows, as JSON-ready data (schemas/arch-report.schema.json).

    >>> arch_report("olmo2-7b")["parameters"]["total"]
    7298617344
    """
    if isinstance(source, str):
        source = resolve(source)
    config = source.config
    context = _check_count("--context", config.max_position_embeddings if context is None else context, MAX_CONTEXT)
    batch = _check_count("--batch", batch, MAX_BATCH)
    prefill = _check_count("--prefill", context if prefill is None else prefill, MAX_CONTEXT)
    if bandwidth is not None:
        bandwidth = _check_bandwidth(bandwidth)
    tensors = checkpoint_tensors(config)
    notes = list(source.notes) + _notes(config, context, prefill) + _prequantized_note(source)
    parameters = _parameters(config, tensors)
    memory = _memory(config, tensors, context, batch)
    return {
        "report": "olmoscope arch",
        "version": REPORT_VERSION,
        "source": _source_info(source),
        "overview": _overview(source),
        "parameters": parameters,
        "memory": memory,
        "compute": _compute(config, parameters, context, prefill),
        "roofline": _roofline(config, parameters, memory, context, bandwidth),
        "tensors": _tensor_rows(config, tensors),
        **({"engine": _engine_layout(source)} if source.kind == "engine" else {}),
        "notes": notes,
    }


def _notes(config: ModelConfig, context: int, prefill: int) -> list[str]:
    notes = []
    trained = config.max_position_embeddings
    lengths = [("--context", context)] + ([("--prefill", prefill)] if prefill != context else [])
    for option, value in lengths:
        if value > trained:
            notes.append(
                f"{option} {value:,} is beyond the trained context ({trained:,}); "
                "OLMo 2 has no RoPE scaling, so quality past it is unknown"
            )
    if config.tie_word_embeddings:
        notes.append("lm_head is tied to the embedding: no tensor of its own, the head reads the embedding matrix")
    return notes


def _check_count(option: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{option} must be an integer, found {value!r}")
    if not 1 <= value <= limit:
        raise UsageError(f"{option} {value:,} is out of range (1 to {limit:,})")
    return value


def _check_bandwidth(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UsageError(f"--bandwidth must be a number of GB/s, found {value!r}")
    if not 0 < value <= MAX_BANDWIDTH_GB_S:
        raise UsageError(f"--bandwidth {value:g} GB/s is out of range (above 0, at most {MAX_BANDWIDTH_GB_S:,.0f})")
    return float(value)


def _source_info(source: Source) -> dict[str, Any]:
    path = source.config_path or source.engine_path
    return {
        "label": source.label,
        "kind": source.kind,
        "repo_id": source.repo_id,
        "revision": source.revision,
        "path": str(path) if path is not None else None,
    }


def _overview(source: Source) -> dict[str, Any]:
    c, raw = source.config, source.raw_config if isinstance(source.raw_config, dict) else {}
    H, Hkv = c.num_attention_heads, c.num_key_value_heads
    return {
        "model_type": raw.get("model_type", "olmo2"),
        "architectures": raw.get("architectures") or ["Olmo2ForCausalLM"],
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": H,
        "num_key_value_heads": Hkv,
        "head_dim": c.head_dim,
        "queries_per_kv_head": c.queries_per_kv_head,
        "attention": "MHA" if H == Hkv else ("MQA" if Hkv == 1 else "GQA"),
        "q_norm_width": c.q_width,
        "k_norm_width": c.kv_width,
        "norm_placement": NORM_PLACEMENT,
        "rope_type": ROPE_TYPE,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "hidden_act": c.hidden_act,
        "attention_bias": False,
        "tie_word_embeddings": c.tie_word_embeddings,
        "vocab_size": c.vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": c.torch_dtype,
    }


def _parameters(config: ModelConfig, tensors: list[TensorSpec]) -> dict[str, Any]:
    L = config.num_hidden_layers
    components: list[dict[str, Any]] = []
    for t in tensors:
        if t.layer is None:
            row = {"component": t.role, "scope": "model", "per_layer": None, "count": 1, "total": t.elements}
        elif t.layer == 0:
            row = {"component": t.role, "scope": "layer", "per_layer": t.elements, "count": L,
                   "total": t.elements * L}
        else:
            continue  # layers 1… repeat layer 0
        components.append(row)
    total = sum(t.elements for t in tensors)
    embedding = sum(t.elements for t in tensors if t.role == "embedding")
    norms = sum(t.elements for t in tensors if len(t.shape) == 1)
    # The head is a matmul over V·D whether or not it has a tensor of its own.
    matmul = total - embedding - norms + (embedding if config.tie_word_embeddings else 0)
    return {
        "components": components,
        "per_layer": sum(c["per_layer"] for c in components if c["scope"] == "layer"),
        "layers_total": sum(c["total"] for c in components if c["scope"] == "layer"),
        "embedding": embedding,
        "norms": norms,
        "matmul": matmul,
        "total": total,
    }


def _weight_bytes(config: ModelConfig, name: str) -> int:
    """bf16/fp16/fp32: every tensor in that type (the checkpoint's size). int8/int4: the engine file's tensors
    with convert's defaults, by the weight-format table."""
    fmt = FORMATS[name]
    specs = engine_tensors(config)
    if not fmt.quantized:
        return sum(spec.elements for spec in specs) * ELEMENT_BITS[fmt.stored] // 8
    group = INT4_DEFAULT_GROUP if fmt.group == "group" else None
    symmetric = fmt.group == "row" or INT4_DEFAULT_SCHEME == "sym"
    total = 0
    for spec in specs:
        stored = fmt.for_tensor(spec.kind, spec.role, fmt.quantized_head)
        if stored is None:
            total += spec.elements * ELEMENT_BITS[NORM_DTYPE] // 8
        else:
            total += stored.matrix_bytes(spec.shape, group, symmetric)
    return total


def _memory(config: ModelConfig, tensors: list[TensorSpec], context: int, batch: int) -> dict[str, Any]:
    weights = [{"format": f, "bytes": _weight_bytes(config, f), "note": note} for f, note in WEIGHT_FORMATS.items()]
    # K and V, per layer, per kv head: 2·L·Hkv·d values per token.
    values_per_token = 2 * config.num_hidden_layers * config.kv_width
    per_token = {"bf16": 2 * values_per_token, "fp32": 4 * values_per_token}
    kv = {
        "formula": "2·L·Hkv·d·bytes",
        "bytes_per_token": per_token,
        "context": context,
        "batch": batch,
        "bytes": {k: v * context * batch for k, v in per_token.items()},
    }
    bf16_weights = next(w["bytes"] for w in weights if w["format"] == "bf16")
    serving = [_serving(n, context, bf16_weights, per_token["bf16"]) for n in sorted({1, batch})]
    return {
        "weights": weights,
        "kv_cache": kv,
        "quantization_note": QUANT_NOTE,
        "serving": serving,
        "serving_note": "bf16 weights + bf16 KV cache at the context; activations and workspace not counted",
    }


def _serving(sequences: int, context: int, weights_bytes: int, kv_bytes_per_token: int) -> dict[str, int]:
    kv_bytes = kv_bytes_per_token * context * sequences
    return {
        "sequences": sequences,
        "context": context,
        "weights_bytes": weights_bytes,
        "kv_cache_bytes": kv_bytes,
        "total_bytes": weights_bytes + kv_bytes,
    }


def _compute(config: ModelConfig, parameters: dict[str, Any], context: int, prefill: int) -> dict[str, Any]:
    L, Hd = config.num_hidden_layers, config.q_width
    matmul_per_token = 2 * parameters["matmul"]
    attention_per_position = 4 * L * Hd  # q·kᵀ (2·H·d) and p·v (2·H·d) per layer, per attended position
    decode_attention = attention_per_position * context
    prefill_matmul = matmul_per_token * prefill
    prefill_attention = attention_per_position * prefill * (prefill + 1) // 2
    return {
        "counted": FLOPS_COUNTED,
        "decode": {
            "context": context,
            "matmul_flops": matmul_per_token,
            "attention_flops": decode_attention,
            "flops_per_token": matmul_per_token + decode_attention,
        },
        "prefill": {
            "tokens": prefill,
            "matmul_flops": prefill_matmul,
            "attention_flops": prefill_attention,
            "flops": prefill_matmul + prefill_attention,
            "note": PREFILL_COUNTED,
        },
    }


def _roofline(
    config: ModelConfig, parameters: dict[str, Any], memory: dict[str, Any], context: int, bandwidth: float | None
) -> dict[str, Any]:
    # bf16: every matmul and norm weight once, one embedding row for the gather.
    weights_read = 2 * (parameters["matmul"] + parameters["norms"] + config.hidden_size)
    kv_read = memory["kv_cache"]["bytes_per_token"]["bf16"] * context
    per_token = weights_read + kv_read
    resident = memory["serving"][0]["total_bytes"]
    gpus = [("given (--bandwidth)", bandwidth, None)] if bandwidth is not None else list(GPUS)
    rows = [
        {
            "gpu": name,
            "bandwidth_gb_s": bw,
            "memory_gb": mem,
            "fits": None if mem is None else resident <= mem * 1e9,
            "tokens_per_s": bw * 1e9 / per_token,
        }
        for name, bw, mem in gpus
    ]
    return {
        "context": context,
        "weights_bytes_read": weights_read,
        "kv_cache_bytes_read": kv_read,
        "bytes_per_token": per_token,
        "gpus": rows,
        "note": ROOFLINE_NOTE,
    }


def _tensor_rows(config: ModelConfig, tensors: list[TensorSpec]) -> list[dict[str, Any]]:
    L = config.num_hidden_layers
    rows = []
    for t in tensors:
        if t.layer not in (None, 0):
            continue
        repeat = 1 if t.layer is None else L
        name = t.name if t.layer is None else t.name.replace("model.layers.0.", "model.layers.{l}.", 1)
        rows.append(
            {
                "scope": "model" if t.layer is None else "layer",
                "repeat": repeat,
                "tensor": name,
                "shape": list(t.shape),
                "formula": " × ".join(SYMBOL_TEXT[s] for s in t.formula),
                "parameters": t.elements,
                "total_parameters": t.elements * repeat,
                "role": t.role,
                "description": ROLE_DESCRIPTIONS[t.role],
            }
        )
    return rows


def _prequantized_note(source: Source) -> list[str]:
    """A GPTQ/AWQ checkpoint says so: the sizes above are of the model, not of its int4 tensors."""
    qc = source.raw_config.get("quantization_config") if isinstance(source.raw_config, dict) else None
    if not isinstance(qc, dict):
        return []
    fields = ", ".join(f"{k} {qc[k]!r}" for k in ("quant_method", "bits", "group_size", "sym", "desc_act",
                                                   "zero_point", "version", "checkpoint_format") if k in qc)
    return [f"{source.label}: a pre-quantized checkpoint ({fields}); `olmoscope convert --dtype int4` imports "
            f"GPTQ and AWQ int4 as stored"]


def _engine_layout(source: Source) -> dict[str, Any]:
    """An engine file as stored: weight dtype, sizes and every stored tensor (fused, cast, with offsets)."""
    from olmoscope import engine_format  # imported late: only engine sources need it

    with engine_format.EngineFile.open(source.engine_path) as engine:
        weight_dtype, rows, quant = engine.weight_dtype, engine_format.engine_rows(engine), engine.quantization
    return {
        "weight_dtype": weight_dtype,
        "quantization": None if quant is None else quant.to_json(),
        "file_bytes": source.engine_path.stat().st_size,
        "tensor_bytes": sum(r.nbytes for r in rows),
        "tensors": [
            {"name": r.name, "role": r.role, "layer": r.layer, "dtype": r.dtype, "shape": list(r.shape),
             "offset": r.offset, "bytes": r.nbytes, "layout": r.layout}
            for r in rows
        ],
    }


# ── human-readable numbers ──────────────────────────────────────────────────────
def human_count(n: float, unit: str = "") -> str:
    """1484916736 → '1.48 B'; with unit 'FLOP' the SI prefixes: '14.6 GFLOP'."""
    steps = ((1e12, "T"), (1e9, "G" if unit else "B"), (1e6, "M"), (1e3, "K" if not unit else "k"))
    for scale, prefix in steps:
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


def human_bytes(n: int) -> str:
    """Binary units: 524288 → '512.00 KiB'."""
    for scale, name in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {name}"
    return f"{n} B"


def summary_lines(source: Source | str) -> list[str]:
    """A few lines about a model, for commands that only need the gist.

    >>> summary_lines("olmo2-7b")[0]
    'OLMo 2 olmo2-7b: 7,298,617,344 parameters (7.30 B)'
    """
    if isinstance(source, str):
        source = resolve(source)
    c = source.config
    tensors = checkpoint_tensors(c)
    total = sum(t.elements for t in tensors)
    bf16 = _weight_bytes(c, "bf16")
    kv_token = 2 * 2 * c.num_hidden_layers * c.kv_width
    heads = f"{c.num_attention_heads} heads × {c.head_dim}"
    if c.num_key_value_heads != c.num_attention_heads:
        heads += f" ({c.num_key_value_heads} kv heads, GQA)"
    return [
        f"OLMo 2 {source.label}: {total:,} parameters ({human_count(total)})",
        f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, MLP {c.intermediate_size}, {heads}, "
        f"vocab {c.vocab_size:,}, context {c.max_position_embeddings:,}",
        f"bf16 weights {human_bytes(bf16)} ({bf16:,} bytes); KV cache {human_bytes(kv_token)} per token in bf16",
    ]


# ── rendering ───────────────────────────────────────────────────────────────────
def render_text(report: dict[str, Any]) -> str:
    """The report as titled tabulate tables, one section each.

    >>> render_text(arch_report("olmo2-1b")).splitlines()[0]
    'OLMo 2 architecture: olmo2-1b (preset, allenai/OLMo-2-0425-1B)'
    """
    s = report["source"]
    where = ", ".join(x for x in (s["kind"], s["repo_id"], s["path"]) if x)
    sections = [
        f"OLMo 2 architecture: {s['label']} ({where})",
        _section("Overview", _render_overview(report["overview"], report.get("engine"))),
        _section("Parameters by component", _render_parameters(report["parameters"], report["overview"])),
        _section("Memory", _render_memory(report["memory"])),
        _section("Compute", _render_compute(report["compute"])),
        _section("Decode roofline (batch 1)", _render_roofline(report["roofline"])),
        _section("Tensors (one layer shown)", _render_tensors(report["tensors"])),
    ]
    if "engine" in report:
        sections.append(_section("Engine file layout (one layer shown)", _render_engine(report["engine"])))
    return "\n\n".join(sections) + "\n"


def _section(title: str, body: str) -> str:
    return f"{title}\n{'═' * len(title)}\n{body}"


def _table(rows: list[list[Any]], headers: list[str], align: str) -> str:
    """align: one letter per column, 'l' or 'r'; cells are preformatted strings."""
    colalign = tuple("right" if a == "r" else "left" for a in align)
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True, colalign=colalign)


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=100)


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.2f}%"


def _render_overview(o: dict[str, Any], engine: dict[str, Any] | None = None) -> str:
    ids = ", ".join(f"{k} {o[k + '_token_id']}" for k in ("bos", "eos", "pad") if o[k + "_token_id"] is not None)
    kv_note = "one kv head per query head" if o["attention"] == "MHA" else "kv heads shared by query heads"
    head_note = "lm_head reads the embedding" if o["tie_word_embeddings"] else "separate lm_head"
    rows = [
        ["model_type / architectures", f"{o['model_type']} / {', '.join(o['architectures'])}", ""],
        ["hidden_size D", f"{o['hidden_size']:,}", "width of the residual stream"],
        ["intermediate_size I", f"{o['intermediate_size']:,}", f"SwiGLU hidden width ({o['hidden_act']} gate)"],
        ["num_hidden_layers L", f"{o['num_hidden_layers']:,}", ""],
        ["num_attention_heads H", f"{o['num_attention_heads']:,}", "query heads"],
        ["num_key_value_heads Hkv", f"{o['num_key_value_heads']:,}", f"{o['attention']}: {kv_note}"],
        ["head_dim d", f"{o['head_dim']:,}", "derived: D / H"],
        ["query heads per kv head", f"{o['queries_per_kv_head']:,}", "derived: H / Hkv"],
        ["q_norm width", f"{o['q_norm_width']:,}", "derived: H·d, RMSNorm over the whole query before RoPE"],
        ["k_norm width", f"{o['k_norm_width']:,}", "derived: Hkv·d, RMSNorm over the whole key before RoPE"],
        ["norm placement", o["norm_placement"], "h = h + RMSNorm(block(h)); no input norms"],
        ["rms_norm_eps", f"{o['rms_norm_eps']:g}", "read from config.json (class default 1e-5)"],
        ["RoPE", o["rope_type"], "not interleaved; no scaling"],
        ["rope_theta", f"{o['rope_theta']:g}", ""],
        ["attention bias", _yes_no(o["attention_bias"]), ""],
        ["tie_word_embeddings", _yes_no(o["tie_word_embeddings"]), head_note],
        ["vocab_size V", f"{o['vocab_size']:,}", "embedding rows (padded beyond the tokenizer's ids)"],
        ["max_position_embeddings", f"{o['max_position_embeddings']:,}", "trained context"],
        ["token ids", ids or "none", ""],
        _stored_dtype_row(o, engine),
    ]
    return _table(rows, ["field", "value", "note"], "lll")


def _stored_dtype_row(o: dict[str, Any], engine: dict[str, Any] | None) -> list[str]:
    """An engine file stores its own --dtype (norms fp32); config.json's torch_dtype is the source's."""
    if engine is None:
        return ["stored dtype", o["torch_dtype"] or "unknown", "torch_dtype in config.json"]
    source = f"; the source was {o['torch_dtype']}" if o["torch_dtype"] else ""
    quant = engine["quantization"]
    how = f"; {_describe(quant)}" if quant else ""
    return ["stored dtype", engine["weight_dtype"], f"the engine file's --dtype (norms fp32){how}{source}"]


def _render_parameters(p: dict[str, Any], overview: dict[str, Any]) -> str:
    total, L = p["total"], overview["num_hidden_layers"]
    rows = []
    for c in p["components"]:
        per_layer = "" if c["per_layer"] is None else f"{c['per_layer']:,}"
        times = f"× {c['count']}" if c["scope"] == "layer" else ""
        rows.append([c["component"], per_layer, times, f"{c['total']:,}", human_count(c["total"]),
                     _share(c["total"], total)])
    rows += [
        ["one layer", f"{p['per_layer']:,}", "", "", human_count(p["per_layer"]), ""],
        ["all layers", "", f"× {L}", f"{p['layers_total']:,}", human_count(p["layers_total"]),
         _share(p["layers_total"], total)],
        ["in matmuls", "", "", f"{p['matmul']:,}", human_count(p["matmul"]), "drives FLOPs"],
        ["total", "", "", f"{total:,}", human_count(total), "100.00%"],
    ]
    return _table(rows, ["component", "per layer", "layers", "total", "", "share"], "lrrrrr")


def _render_memory(m: dict[str, Any]) -> str:
    rows = [[w["format"], f"{w['bytes']:,}", human_bytes(w["bytes"]), w["note"]] for w in m["weights"]]
    weights = _table(rows, ["weights", "bytes", "", "assumes"], "lrrl")
    kv = m["kv_cache"]
    per_token, at_context = kv["bytes_per_token"], kv["bytes"]
    rows = [[f"per token ({kv['formula']})", f"{per_token[d]:,}", human_bytes(per_token[d]), d] for d in per_token]
    where = f"context {kv['context']:,} × batch {kv['batch']:,}"
    rows += [[where, f"{at_context[d]:,}", human_bytes(at_context[d]), d] for d in at_context]
    kv_table = _table(rows, ["KV cache", "bytes", "", "dtype"], "lrrl")
    rows = [
        [f"{r['sequences']:,} × context {r['context']:,}", human_bytes(r["weights_bytes"]),
         human_bytes(r["kv_cache_bytes"]), f"{r['total_bytes']:,}", human_bytes(r["total_bytes"])]
        for r in m["serving"]
    ]
    serving = _table(rows, ["serving (sequences)", "bf16 weights", "KV cache", "total bytes", ""], "lrrrr")
    return "\n\n".join([weights, _wrap(m["quantization_note"]), kv_table, serving, _wrap(m["serving_note"])])


def _render_compute(c: dict[str, Any]) -> str:
    d, pf = c["decode"], c["prefill"]
    rows = [
        [f"decode 1 token at context {d['context']:,}", d["matmul_flops"], d["attention_flops"],
         d["flops_per_token"]],
        [f"prefill {pf['tokens']:,} tokens", pf["matmul_flops"], pf["attention_flops"], pf["flops"]],
    ]
    rows = [[label, f"{mm:,}", f"{att:,}", f"{tot:,}", human_count(tot, "FLOP")] for label, mm, att, tot in rows]
    table = _table(rows, ["compute", "matmul FLOPs", "attention FLOPs", "total FLOPs", ""], "lrrrr")
    return "\n".join([table, _wrap(c["counted"]), _wrap(f"Prefill: {pf['note']}.")])


def _render_roofline(r: dict[str, Any]) -> str:
    rows = [
        [g["gpu"], f"{g['bandwidth_gb_s']:,.0f}", "" if g["memory_gb"] is None else f"{g['memory_gb']:g}",
         "" if g["fits"] is None else _yes_no(g["fits"]), f"{g['tokens_per_s']:,.1f}"]
        for g in r["gpus"]
    ]
    table = _table(rows, ["GPU", "GB/s", "memory GB", "fits", "tokens/s ceiling"], "lrrlr")
    read = (
        f"Bytes read per token at context {r['context']:,}: {r['bytes_per_token']:,} "
        f"({human_bytes(r['bytes_per_token'])}) = weights {human_bytes(r['weights_bytes_read'])} "
        f"+ KV cache {human_bytes(r['kv_cache_bytes_read'])}."
    )
    return "\n".join([table, _wrap(read), _wrap(r["note"])])


def _render_tensors(tensors: list[dict[str, Any]]) -> str:
    rows = [
        ["model" if t["scope"] == "model" else f"layer ×{t['repeat']}", t["tensor"],
         " × ".join(str(n) for n in t["shape"]), t["formula"], f"{t['parameters']:,}", t["description"]]
        for t in tensors
    ]
    return _table(rows, ["scope", "tensor", "shape", "formula", "parameters", "role"], "llrlrl")


def _describe(quantization: dict[str, Any]) -> str:
    from olmoscope.engine_format import Quantization

    return Quantization.from_json(quantization).describe()


def _render_engine(e: dict[str, Any]) -> str:
    rows = [
        [t["name"], " × ".join(str(n) for n in t["shape"]), t["dtype"], f"{t['bytes']:,}", f"{t['offset']:,}",
         t["layout"]]
        for t in e["tensors"] if t["layer"] in (None, 0)
    ]
    table = _table(rows, ["tensor", "shape", "dtype", "bytes", "offset", "layout"], "lrlrrl")
    quant = e["quantization"]
    described = f" ({_describe(quant)})" if quant else ""
    summary = (
        f"Weight dtype {e['weight_dtype']}{described}; {len(e['tensors'])} stored arrays, {e['tensor_bytes']:,} bytes "
        f"({human_bytes(e['tensor_bytes'])}) of tensor data in a {e['file_bytes']:,}-byte file. Every layer has "
        "layer 0's layout at its own offsets (`olmoscope tensors FILE` lists them all)."
    )
    return "\n".join([table, _wrap(summary)])


CSV_COLUMNS = (
    "scope", "repeat", "tensor", "shape", "formula", "parameters", "total_parameters", "role", "description",
)


def tensors_csv(report: dict[str, Any]) -> str:
    """The per-layer tensor table as CSV text; shape as '4096x4096'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for t in report["tensors"]:
        row = dict(t, shape="x".join(str(n) for n in t["shape"]))
        writer.writerow([row[c] for c in CSV_COLUMNS])
    return out.getvalue()


# ── the command ─────────────────────────────────────────────────────────────────
@click.command("arch", help=f"""Explain the architecture a config implies: overview, parameters by component,
memory (weights, KV cache), compute (FLOPs), a decode roofline and the per-layer tensor table.

Only the model config is read, never tensor data. {SOURCE_HELP}""")
@click.argument("source")
@click.option("--context", type=int, metavar="N",
              help=f"Context length for the KV cache, decode FLOPs and the roofline (1 to {MAX_CONTEXT:,}). "
              "[default: max_position_embeddings]")
@click.option("--batch", type=int, default=1, show_default=True, metavar="B",
              help=f"Sequences held in the KV cache (1 to {MAX_BATCH:,}); "
              "the serving total is also shown for one sequence.")
@click.option("--prefill", type=int, metavar="N",
              help=f"Prompt length for the prefill FLOPs (1 to {MAX_CONTEXT:,}). [default: the context]")
@click.option("--bandwidth", type=float, metavar="GB/s",
              help="Memory bandwidth for the decode roofline; replaces the named GPUs "
              "(H100 SXM, H200, A100 80GB, RTX 4090).")
@click.option("--json", "as_json", is_flag=True,
              help="Print the whole report as JSON (schemas/arch-report.schema.json).")
@click.option("--csv", "csv_path", metavar="FILE",
              help="Write the per-layer tensor table as CSV to FILE ('-' for stdout, then no tables).")
def arch_command(source: str, context: int | None, batch: int, prefill: int | None, bandwidth: float | None,
                 as_json: bool, csv_path: str | None) -> None:
    if as_json and csv_path == "-":
        raise UsageError("--json and --csv - both write to stdout; give --csv a FILE")
    resolved = resolve(source)
    report = arch_report(resolved, context=context, batch=batch, bandwidth=bandwidth, prefill=prefill)
    for note in report["notes"]:
        click.echo(f"olmoscope: note: {note}", err=True)
    if csv_path == "-":
        click.echo(tensors_csv(report), nl=False)
        return
    if csv_path is not None:
        write_text_atomically(csv_path, tensors_csv(report), "--csv")
    if as_json:
        click.echo(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        click.echo(render_text(report), nl=False)
