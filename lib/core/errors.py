"""One exception hierarchy: scripts print `error: <message>` and exit 2 for these."""


class ForestGapsError(Exception):
    """A user-facing error: bad input, bad config, broken file. Carries an optional hint."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  hint: {self.hint}" if self.hint else text


class ConfigError(ForestGapsError):
    """Config file or override is invalid (unknown key, bad type, bad syntax)."""


class DataError(ForestGapsError):
    """Input data is missing, malformed or inconsistent."""


class RasterError(DataError):
    """A GeoTIFF cannot be read, written or paired."""


class ShardError(DataError):
    """A tar shard or its manifest is corrupt, truncated or unsafe."""


class ModelError(ForestGapsError):
    """A model cannot be built or a checkpoint does not fit it."""


class TrainingError(ForestGapsError):
    """Training cannot continue (non-finite loss, divergence, out of memory)."""


class ExportError(ForestGapsError):
    """Export failed or the exported model does not match the eager one."""
