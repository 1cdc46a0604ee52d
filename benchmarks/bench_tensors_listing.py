"""How long `olmoscope tensors` takes on a 13B-sized checkpoint: headers only, so well under a second.

The fixture is shaped like allenai/OLMo-2-1124-13B: 12 float32 shards holding the olmo2-13b preset's real
tensor names and shapes (a layer may straddle two shards), real safetensors headers, and data that is
all holes (the files are truncated to their full ~55 GB length but take no disk space). Not a test.

    python3 benchmarks/bench_tensors_listing.py [--runs 7] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from olmoscope.checkpoint import Checkpoint, check_against_config
from olmoscope.sources import resolve
from olmoscope.spec import checkpoint_tensors
from olmoscope.tensors import report_dict, table_rows, tensor_source, text_report

SHARDS = 12
PRESET = "olmo2-13b"


def write_sparse_snapshot(directory: Path) -> None:
    """config.json, index and 12 shards whose headers are real and whose data are holes."""
    source = resolve(PRESET)
    (directory / "config.json").write_text(json.dumps(source.raw_config, indent=2))
    tensors = checkpoint_tensors(source.config)
    total = sum(4 * t.elements for t in tensors)
    weight_map: dict[str, str] = {}
    shard_tensors: list[list] = [[] for _ in range(SHARDS)]
    written = 0
    for t in tensors:  # fill shards in natural order, each to about total/12 bytes
        shard_tensors[min(SHARDS - 1, written * SHARDS // total)].append(t)
        written += 4 * t.elements
    for i, members in enumerate(shard_tensors):
        name = f"model-{i + 1:05d}-of-{SHARDS:05d}.safetensors"
        header: dict = {"__metadata__": {"format": "pt"}}
        position = 0
        for t in members:
            header[t.name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [position, position + 4 * t.elements]}
            weight_map[t.name] = name
            position += 4 * t.elements
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # safetensors pads the header so the data starts 8-byte aligned
        with open(directory / name, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(8 + len(text) + position)  # the data: a hole, no disk blocks
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def list_once(directory: Path) -> tuple[float, float, str]:
    """(seconds for Checkpoint.open, seconds for open + the whole text listing, the listing)."""
    start = time.perf_counter()
    Checkpoint.open(directory)
    opened = time.perf_counter() - start

    start = time.perf_counter()
    tensors = tensor_source(resolve(str(directory)))
    check = check_against_config(tensors.rows, tensors.source.config)
    headers, body = table_rows(tensors.rows, None)
    text = text_report(report_dict(tensors, tensors.rows, check, None, None, None), headers, body)
    return opened, time.perf_counter() - start, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--keep", type=Path, help="write the fixture here and keep it (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="olmoscope-bench-") as temp:
        directory = args.keep or Path(temp)
        directory.mkdir(parents=True, exist_ok=True)
        write_sparse_snapshot(directory)
        shards = sorted(directory.glob("*.safetensors"))
        apparent = sum(p.stat().st_size for p in shards)
        on_disk = sum(p.stat().st_blocks * 512 for p in shards)
        runs = [list_once(directory) for _ in range(args.runs)]
        text = runs[-1][2]
        expected = len(checkpoint_tensors(resolve(PRESET).config))
        assert f"Check against config ({expected} tensors implied): ok" in text, text[-300:]
        opens, listings = [r[0] for r in runs], [r[1] for r in runs]
        print(f"fixture: {len(shards)} shards of {PRESET}, {apparent / 1e9:.1f} GB apparent, "
              f"{on_disk / 1e6:.1f} MB on disk, {os.cpu_count()} CPUs")
        print(f"Checkpoint.open:            median {statistics.median(opens) * 1e3:7.1f} ms  "
              f"(min {min(opens) * 1e3:.1f}, max {max(opens) * 1e3:.1f}, {args.runs} runs)")
        print(f"open + check + text listing: median {statistics.median(listings) * 1e3:7.1f} ms  "
              f"(min {min(listings) * 1e3:.1f}, max {max(listings) * 1e3:.1f}, {args.runs} runs)")


if __name__ == "__main__":
    main()
