"""The options every command that runs an engine loop takes (batch, serve), defined once.

    >>> @click.command()
    ... @engine_options
    ... def run(device: str, options: RuntimeOptions, verify: bool) -> None: ...
"""

from __future__ import annotations

import functools

import click

ENGINE_OPTIONS = (
    click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
                 help="auto: the CUDA backend when a GPU and PyCUDA are present, else the NumPy reference."),
    click.option("--max-num-seqs", type=int, default=256, show_default=True, help="Sequences running at once."),
    click.option("--max-num-batched-tokens", type=int, default=4096, show_default=True,
                 help="Token rows in one step (prompts are prefilled in chunks of at most this)."),
    click.option("--max-context", type=int,
                 help="Positions one sequence may hold (prompt + completion). [default: the model's context length]"),
    click.option("--kv-cache-gib", type=float,
                 help="KV cache size. [default: from free memory: --gpu-memory-utilization on a GPU]"),
    click.option("--gpu-memory-utilization", type=float, default=0.9, show_default=True,
                 help="Share of the GPU's memory for weights, KV cache and buffers."),
    click.option("--no-verify", is_flag=True, help="Skip checking each tensor's checksum as it is first read."),
)


def engine_options(command):
    """Add ENGINE_OPTIONS to a click command, handing it `device`, `options` (RuntimeOptions) and `verify`."""

    @functools.wraps(command)
    def wrapper(*args, max_num_seqs: int, max_num_batched_tokens: int, max_context: int | None,
                kv_cache_gib: float | None, gpu_memory_utilization: float, no_verify: bool, **kwargs):
        from olmoscope.runtime.backend import RuntimeOptions

        options = RuntimeOptions(max_context=max_context, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens, kv_cache_gib=kv_cache_gib,
                                 gpu_memory_utilization=gpu_memory_utilization)
        return command(*args, options=options, verify=not no_verify, **kwargs)

    for option in reversed(ENGINE_OPTIONS):
        wrapper = option(wrapper)
    return wrapper
