"""SOURCE resolution, shared by every command: a path, a config.json, a cached repo id or a preset."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from olmoscope.config import ModelConfig, read_config_json
from olmoscope.errors import ConfigError, SourceError
from olmoscope.readers import parse_json

PRESETS = {
    "olmo2-1b": "allenai/OLMo-2-0425-1B",
    "olmo2-7b": "allenai/OLMo-2-1124-7B",
    "olmo2-13b": "allenai/OLMo-2-1124-13B",
    "olmo2-32b": "allenai/OLMo-2-0325-32B",
}

_REPO_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")

SOURCE_HELP = (
    "SOURCE is a snapshot directory, a config.json, a Hugging Face repo id (org/name[@revision]) "
    "found in the local cache, a preset (" + ", ".join(PRESETS) + "), or an engine file."
)


@dataclass
class Source:
    """A resolved SOURCE: its validated config and where its tensors live, if anywhere."""

    kind: str  # "snapshot", "config", "hub", "preset" or "engine"
    label: str  # SOURCE as the user wrote it
    config: ModelConfig  # validated
    raw_config: dict[str, Any]  # config.json as parsed, for provenance and reports
    directory: Path | None = None  # where the safetensors shards are; None for presets
    config_path: Path | None = None  # the config.json read, None for presets and engines
    repo_id: str | None = None  # the Hugging Face repo (hub and preset sources)
    revision: str | None = None  # the requested revision (hub sources)
    engine_path: Path | None = None  # the engine file (engine sources)
    notes: list[str] = field(default_factory=list)  # warnings for the user (stderr)


def resolve(label: str) -> Source:
    """Resolve SOURCE as written on the command line.

    >>> resolve("olmo2-7b").config.hidden_size
    4096
    """
    if label in PRESETS:
        return _preset(label)
    path = Path(label).expanduser()
    if path.is_dir():
        return _from_config(path / "config.json", label, kind="snapshot")
    if path.is_file():
        return _from_file(path, label)
    if os.path.islink(path):
        raise SourceError(f"{label}: no such file (a dangling symbolic link)")
    if path.exists():  # a FIFO or a device: never opened, it could block or stream forever
        raise SourceError(f"{label}: not a regular file or a directory. {SOURCE_HELP}")
    match = _REPO_ID.match(label)
    if match and not path.exists() and not label.startswith((".", "/", "~")):
        return _from_hub(label, match["repo"], match["rev"])
    raise SourceError(f"{label}: no such file or directory, and not a preset or a repo id. {SOURCE_HELP}")


def _from_file(path: Path, label: str) -> Source:
    """A file SOURCE, told apart by its first bytes: an engine file, a safetensors file, or a config.json."""
    from olmoscope import engine_format  # imported late: only files need it

    head = engine_format.file_start(path)
    if head.startswith(engine_format.MAGIC):
        return engine_format.source_from_engine(path, label)
    if _looks_like_safetensors(head):
        config_path = path.parent / "config.json"
        if not os.path.lexists(config_path):
            raise SourceError(f"{label}: a safetensors file is read with the config.json beside it, and "
                              f"{path.parent} has none")
        source = _from_config(config_path, label, kind="snapshot")
        source.notes.append(f"{label}: a safetensors file; reading its snapshot directory {path.parent}")
        return source
    if path.suffix == ".json" or not head or head.lstrip()[:1] in (b"{", b"["):
        return _from_config(path, label, kind="config")
    raise SourceError(engine_format.not_an_engine(path, head))


def _looks_like_safetensors(head: bytes) -> bool:
    """8 bytes of little-endian header length, then the header's opening brace."""
    return len(head) > 8 and 2 <= int.from_bytes(head[:8], "little") <= 100_000_000 and head[8:9] == b"{"


def _from_config(config_path: Path, label: str, kind: str) -> Source:
    if not os.path.lexists(config_path):  # present but a FIFO or a dangling link: the reader names it
        raise SourceError(f"{label}: no config.json in {config_path.parent}")
    raw = read_config_json(config_path)
    config = ModelConfig.from_dict(raw, origin=str(config_path))
    source = Source(kind, label, config, raw, directory=config_path.parent, config_path=config_path)
    if isinstance(raw, dict) and raw.get("auto_map"):
        source.notes.append(f"{config_path}: auto_map is ignored (olmoscope never runs code from a checkpoint)")
    return source


def _preset(name: str) -> Source:
    data = resources.files("olmoscope").joinpath("data", "presets", f"{name}.json").read_bytes()
    raw = parse_json(data, f"preset {name}", ConfigError)
    config = ModelConfig.from_dict(raw, origin=f"preset {name}")
    return Source("preset", name, config, raw, repo_id=PRESETS[name])


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (HF_HUB_CACHE, then HF_HOME)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _from_hub(label: str, repo_id: str, revision: str | None) -> Source:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    if revision is not None and ".." in revision.split("/"):  # git refuses such names; here it would escape refs/
        raise SourceError(f"{label}: revision {revision!r} is not a valid branch, tag or commit")
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, HFValidationError, OSError):
        rev = f" --revision {revision}" if revision else ""
        raise SourceError(
            f"{label}: not in the local Hugging Face cache ({cache}); download it with: "
            f"hf download {repo_id}{rev}"
        ) from None
    source = _from_config(Path(folder) / "config.json", label, kind="hub")
    source.repo_id, source.revision = repo_id, revision
    return source
