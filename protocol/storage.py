"""Durable local files: written so that a crash leaves the old content or the new, never half.

Other processes read some of these files (the server's public key, ready
files) while they are replaced, and several writers may replace one at once:
each writer makes its own temporary file (a random name, ``O_EXCL``, so none
follows a planted link or shares another's), fsyncs it, renames it over the
target and fsyncs the directory, so the rename itself survives a crash.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterable
from pathlib import Path

SECRET_MODE = 0o600
PUBLIC_MODE = 0o644


def write_atomic(path: Path, data: bytes | Iterable[bytes], mode: int = SECRET_MODE) -> None:
    """Write ``data`` to ``path`` via a private temporary file, fsync and rename; the file gets exactly ``mode``
    (owner-only unless a caller says the content is public), whatever the umask.

    ``data`` may also be pieces written one after another, so a large file (a model's bundle) is never
    joined into one more copy in memory first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
    try:
        try:
            os.fchmod(fd, mode)
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable: until the directory is synced, a crash can undo it.

    Some file systems cannot sync a directory (they answer EINVAL or ENOTSUP:
    FUSE mounts, and possibly Gramine's); there the file itself is synced and
    nothing more can be done.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
