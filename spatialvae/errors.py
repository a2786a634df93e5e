"""Errors a user can cause and fix.

Everything the command line reports as one clear line (no traceback) derives from
`SpatialVAEError`. Each message says what was wrong and how to fix it.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from typing import Iterator, Optional


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


# The write failures a user fixes by making room (or by moving to a healthy disk), and how each is said.
_DISK_REASONS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                 errno.EIO: "the disk reported an I/O error"}


def disk_failure(e: Optional[BaseException]) -> Optional[OSError]:
    """The full-disk, quota or I/O `OSError` behind ``e``: ``e`` itself or one it was raised while
    handling (torch's serializer, for one, raises a RuntimeError on top of it); ``None`` if none."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_REASONS:
            return e
        e = e.__cause__ or e.__context__
    return None


class WriteError(SpatialVAEError):
    """A file that could not be written: no permission, a folder or file in the way, a full disk."""

    def __init__(self, path: str | os.PathLike, reason: str, message: Optional[str] = None):
        self.path, self.reason = str(path), reason
        super().__init__(message or f"cannot write {path} ({reason}); pass a path in a folder you can write to")


class DiskFullError(WriteError):
    """A write that failed for lack of space, quota or a failing disk. The one line names the file,
    what is still there (``kept``) and how to go on (``fix``); see `on_disk_full`."""

    def __init__(self, path: str | os.PathLike, reason: str, kept: Optional[str] = None,
                 fix: Optional[str] = None):
        self.kept, self.fix = kept, fix
        kept = kept or f"{path} is as it was before this write (files are replaced whole or not at all)"
        fix = fix or "free space (or raise the quota), then run the command again"
        super().__init__(path, reason, f"cannot write {path}: {reason}; {kept}; {fix}")


def write_error(path: str | os.PathLike, e: BaseException) -> WriteError:
    """The one-line error for a write of ``path`` that raised ``e``: every writer reports through here."""
    disk = disk_failure(e)
    if disk is not None:
        return DiskFullError(path, f"{_DISK_REASONS[disk.errno]} ({short_reason(disk)})")
    return WriteError(path, short_reason(e))


@contextmanager
def on_disk_full(kept: str, fix: str) -> Iterator[None]:
    """A `DiskFullError` raised inside says ``kept`` (what is still there) and ``fix`` (how to go on).
    Nested, the innermost wins: it knows best what its own write was part of."""
    try:
        yield
    except DiskFullError as e:
        if e.kept is not None:
            raise
        raise DiskFullError(e.path, e.reason, kept, fix) from None
