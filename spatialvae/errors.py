"""Errors a user can cause and fix.

Everything the command line reports as one clear line (no traceback) derives from
`SpatialVAEError`. Each message says what was wrong and how to fix it.
"""

from __future__ import annotations


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
