"""The NumPy reference runtime agrees with transformers' Olmo2ForCausalLM on the same weights.

Tolerance: ‖ours − theirs‖ / ‖theirs‖ ≤ 1e-5 for the full-prompt logits [T, V] and for each of 32 decode
steps' logits [V] (the KV-cache path); greedy generations of 32 tokens identical. bf16 engines are
compared with transformers run in float32 on the same bf16-rounded weights, within the same bounds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import Olmo2Config, Olmo2ForCausalLM

from olmoscope.config import ModelConfig
from olmoscope.runtime.backend import RuntimeOptions
from olmoscope.runtime.engine import Engine, open_engine
from olmoscope.runtime.generator import run_generation
from olmoscope.runtime.numpy_backend import NumpyBackend
from olmoscope.runtime.sampler import SamplingParams
from olmoscope.spec import engine_tensors
from stepping import prompt_logits, teacher_forced_logits

TOLERANCE = 1e-5  # relative Frobenius error, float32 against float32
PROMPT_TOKENS = 12
DECODE_STEPS = 32

# name → (hidden D, heads H, kv heads Hkv, intermediate I, layers L, vocab V, tied embeddings)
SHAPES = {
    "mha-d64": (128, 2, 2, 256, 3, 1000, False),
    "gqa2-d64-odd-vocab": (256, 4, 2, 384, 3, 1001, False),
    "gqa4-d64": (256, 4, 1, 256, 4, 1000, False),
    "gqa2-d128-odd-vocab": (256, 2, 1, 512, 3, 1001, False),
    "mha-d128-tied": (256, 2, 2, 256, 3, 1000, True),
}


# ── helpers: a random transformers model, and its weights under engine names ─────────────
def hf_config(shape: str) -> Olmo2Config:
    D, H, Hkv, I, L, V, tied = SHAPES[shape]
    return Olmo2Config(
        vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=H,
        num_key_value_heads=Hkv, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=500000.0,
        tie_word_embeddings=tied, eos_token_id=None, pad_token_id=None, bos_token_id=None,
    )


def random_model(shape: str, seed: int = 0, bf16: bool = False) -> Olmo2ForCausalLM:
    """Random weights; norm weights 1 + 0.1·randn so they matter; bf16: matrices rounded to bf16."""
    torch.manual_seed(seed)
    model = Olmo2ForCausalLM._from_config(hf_config(shape), attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif bf16:
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def model_config(model: Olmo2ForCausalLM) -> ModelConfig:
    raw = model.config.to_dict()
    raw["architectures"] = ["Olmo2ForCausalLM"]
    return ModelConfig.from_dict(raw, origin="test model")


def fuse_checkpoint(state_dict: dict[str, torch.Tensor], config: ModelConfig, matrix_dtype=np.float32) -> dict:
    """Engine-named arrays from a checkpoint state_dict: parts' rows concatenated as spec.engine_tensors says."""
    arrays = {}
    for spec in engine_tensors(config):
        rows = np.concatenate([state_dict[part.name].detach().float().numpy() for part in spec.sources], axis=0)
        arrays[spec.name] = rows.astype(matrix_dtype if spec.kind == "matrix" else np.float32)
    return arrays


def engine_for(model: Olmo2ForCausalLM, matrix_dtype=np.float32) -> Engine:
    config = model_config(model)
    return Engine.from_arrays(config, fuse_checkpoint(model.state_dict(), config, matrix_dtype))


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _cache_of(output):
    return output.cache if "cache" in output else output.past_key_values


_CACHE_ARG = "cache" if "cache" in inspect.signature(Olmo2ForCausalLM.forward).parameters else "past_key_values"


@dataclass
class TransformersRun:
    prompt_logits: np.ndarray  # [T, V]
    tokens: list[int]  # greedy: the first from the prompt, then one per decode step (DECODE_STEPS + 1)
    step_logits: list[np.ndarray]  # [V] for each decode step, fed tokens[i]


def transformers_run(model: Olmo2ForCausalLM, prompt: np.ndarray) -> TransformersRun:
    """Prompt logits, then greedy decoding through transformers' own KV cache."""
    with torch.no_grad():
        out = model(torch.from_numpy(prompt)[None], use_cache=True)
        prompt_logits = out.logits[0].numpy().copy()
        cache = _cache_of(out)
        tokens, step_logits = [int(out.logits[0, -1].argmax())], []
        for _ in range(DECODE_STEPS):
            out = model(torch.tensor([[tokens[-1]]]), use_cache=True, **{_CACHE_ARG: cache})
            cache = _cache_of(out)
            step_logits.append(out.logits[0, -1].numpy().copy())
            tokens.append(int(out.logits[0, -1].argmax()))
    return TransformersRun(prompt_logits, tokens, step_logits)


def random_prompt(vocab: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, PROMPT_TOKENS).astype(np.int64)


def compare(backend: NumpyBackend, theirs: TransformersRun, prompt: np.ndarray) -> tuple[float, float]:
    """(prompt logits rel err, worst decode-step rel err), feeding transformers' greedy tokens to ours."""
    tokens = prompt.tolist() + theirs.tokens[:DECODE_STEPS]
    ours = teacher_forced_logits(backend, tokens, len(prompt))
    prompt_rel = relative_error(ours[0], theirs.prompt_logits)
    step_rels = [relative_error(mine, logits) for mine, logits in zip(ours[1:], theirs.step_logits)]
    return prompt_rel, max(step_rels)


def greedy_tokens(backend: NumpyBackend, prompt: np.ndarray, count: int) -> list[int]:
    return run_generation(backend, prompt.tolist(), SamplingParams(), max_new_tokens=count).token_ids


def check_against_transformers(model: Olmo2ForCausalLM, engine: Engine, label: str) -> None:
    prompt = random_prompt(model.config.vocab_size)
    theirs = transformers_run(model, prompt)
    backend = NumpyBackend(engine)
    prompt_rel, step_rel = compare(backend, theirs, prompt)
    print(f"{label}: prompt logits rel {prompt_rel:.2e}, worst of {DECODE_STEPS} decode steps {step_rel:.2e}")
    assert prompt_rel <= TOLERANCE, f"prompt logits rel err {prompt_rel:.2e}"
    assert step_rel <= TOLERANCE, f"decode-step logits rel err {step_rel:.2e}"
    assert greedy_tokens(backend, prompt, DECODE_STEPS) == theirs.tokens[:DECODE_STEPS]
    backend.close()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_dtype", ["fp32", "bf16"])
class TestAgainstTransformers:
    def test_in_memory_engine_logits_and_greedy_tokens_match(self, shape: str, weight_dtype: str):
        bf16 = weight_dtype == "bf16"
        model = random_model(shape, bf16=bf16)
        engine = engine_for(model, ml_dtypes.bfloat16 if bf16 else np.float32)
        assert engine.weights.dtype == weight_dtype
        check_against_transformers(model, engine, f"in memory {shape} {weight_dtype}")

    @pytest.mark.slow
    def test_saved_converted_engine_logits_and_greedy_tokens_match(self, shape: str, weight_dtype: str, tmp_path):
        """save_pretrained (sharded) → olmoscope convert → engine file → NumPy runtime."""
        from olmoscope.convert import convert

        model = random_model(shape)
        model.save_pretrained(tmp_path / "snapshot", max_shard_size="300KB")
        assert (tmp_path / "snapshot" / "model.safetensors.index.json").is_file()  # really sharded
        convert(str(tmp_path / "snapshot"), tmp_path / "model.olmo", dtype=weight_dtype)
        if weight_dtype == "bf16":
            model = random_model(shape, bf16=True)  # transformers in float32 on the bf16-rounded weights
        with open_engine(tmp_path / "model.olmo") as engine:
            assert engine.weights.dtype == weight_dtype
            check_against_transformers(model, engine, f"converted {shape} {weight_dtype}")


@pytest.mark.slow
def test_int8_engine_matches_transformers_on_the_dequantized_weights(tmp_path):
    """int8 (w ≈ q·scale per row): the runtime must be exact on q·scale; only quantization itself errs."""
    from olmoscope.convert import convert

    model = random_model("gqa2-d64-odd-vocab")
    model.save_pretrained(tmp_path / "snapshot")
    convert(str(tmp_path / "snapshot"), tmp_path / "model.olmo", dtype="int8")
    with open_engine(tmp_path / "model.olmo") as engine:
        assert engine.weights.dtype == "int8"
        state = model.state_dict()
        with torch.no_grad():  # transformers gets the weights the int8 file actually holds
            for spec in engine_tensors(engine.config):
                rows = np.cumsum([0] + [part.shape[0] for part in spec.sources])
                dequantized = engine.weights.float32(spec.name)
                for part, begin, end in zip(spec.sources, rows[:-1], rows[1:]):
                    state[part.name].copy_(torch.from_numpy(dequantized[begin:end].copy()))
        check_against_transformers(model, engine, "converted gqa2-d64-odd-vocab int8")


def test_chunked_prefill_equals_one_prefill_bit_for_bit():
    model = random_model("gqa2-d64-odd-vocab")
    backend = NumpyBackend(engine_for(model))
    prompt = random_prompt(model.config.vocab_size)
    whole = prompt_logits(backend, prompt)
    parts = teacher_forced_logits(backend, prompt, len(prompt), chunks=[5])[0]
    assert np.array_equal(parts, whole), f"chunked prefill differs: rel err {relative_error(parts, whole):.2e}"


def test_padded_vocabulary_rows_are_never_chosen():
    model = random_model("mha-d64")
    config = model_config(model)
    arrays = fuse_checkpoint(model.state_dict(), config)
    prompt = random_prompt(config.vocab_size)
    winner = int(prompt_logits(NumpyBackend(Engine.from_arrays(config, arrays)), prompt)[-1].argmax())
    arrays["lm_head"][-1] = 10 * arrays["lm_head"][winner]  # the last row, made padding below, now wins by far
    backend = NumpyBackend(Engine.from_arrays(config, arrays))
    backend.vocab_limit = config.vocab_size - 1
    assert prompt_logits(backend, prompt)[-1].argmax() == config.vocab_size - 1
    tokens = greedy_tokens(backend, prompt, 8)
    sampled = run_generation(backend, prompt.tolist(), SamplingParams(temperature=1.5), 8, seed=3).token_ids
    assert max(tokens + sampled) < backend.vocab_limit


def test_prompt_longer_than_the_context_is_refused():
    from olmoscope.errors import UsageError

    backend = NumpyBackend(engine_for(random_model("mha-d64")), RuntimeOptions(max_context=8))
    with pytest.raises(UsageError, match="more than the context"):
        run_generation(backend, list(range(9)), SamplingParams(), 4)


def test_generation_stops_with_context_when_the_context_fills():
    backend = NumpyBackend(engine_for(random_model("mha-d64")), RuntimeOptions(max_context=16))
    result = run_generation(backend, list(range(12)), SamplingParams(), 10)
    # 12 prompt positions + 4 decoded fill 16; the 5th token is chosen from the last position's logits
    assert (len(result.token_ids), result.finish_reason) == (5, "context")
    exact = run_generation(backend, list(range(12)), SamplingParams(), 5)
    assert (exact.token_ids, exact.finish_reason) == (result.token_ids, "length")  # the limit said so first
