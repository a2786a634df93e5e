"""Errors a user can cause and fix.

Everything the command line reports as one clear line (no traceback) derives from
`SpatialVAEError`. Each message says what was wrong and how to fix it.
"""

from __future__ import annotations


def short_reason(e: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message`, shortened, so every error message stays on one line."""
    first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    if len(first) > limit:
        first = first[: limit - 3] + "..."
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class SpatialVAEError(Exception):
    """Base class: the CLI prints `error: <message>` and exits with status 2."""


class ConfigError(SpatialVAEError, ValueError):
    """A config key or value that cannot work (raised before any work starts)."""


class DatasetError(SpatialVAEError, FileNotFoundError):
    """The chest X-ray dataset is missing, misplaced or has no usable images."""


class WeightsError(SpatialVAEError):
    """Pretrained weights (VGG16, Inception) that cannot be loaded: never silently replaced."""


class CheckpointError(SpatialVAEError):
    """A checkpoint that is missing, corrupt, or from an incompatible config."""
