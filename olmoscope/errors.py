"""The project's own errors: anything a user can cause ends up as one of these, shown as one line."""


class OlmoscopeError(Exception):
    """Base of every error the CLI reports as one line on stderr (never a traceback)."""

    exit_code = 1


class UsageError(OlmoscopeError):
    """A bad option or combination of options."""

    exit_code = 2


class SourceError(OlmoscopeError):
    """SOURCE could not be resolved: missing path, repo not cached, unknown preset."""


class ConfigError(OlmoscopeError):
    """config.json is unreadable, not OLMo 2, or holds inconsistent or absurd values."""


class CheckpointError(OlmoscopeError):
    """A safetensors shard or index is malformed or disagrees with itself."""


class EngineError(OlmoscopeError):
    """An engine file is malformed, of an unknown version, or fails its checksums."""


class DeviceError(OlmoscopeError):
    """The GPU refused: no device, not enough memory, a kernel that fails to build or to run."""
