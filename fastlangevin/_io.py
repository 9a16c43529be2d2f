"""Files written atomically, shared by the layers that persist state (trainers' run folders, metrics' caches).

A write goes to ``.<name>.<pid>.<random>.tmp`` in the target's folder, is fsync'ed and renamed over the target, so
a reader sees the old file or the new one, never a torn one. The file gets the permissions any new file gets here
(0666 less the umask; ``mkstemp`` alone would make it 0600). A process killed mid-write leaves its temporary file;
``remove_stale_temporaries`` deletes those whose process is gone.
"""

from __future__ import annotations

import os
import re
import tempfile

_TEMPORARY = re.compile(r"^\..+\.(?P<pid>\d+)\.[^.]+\.tmp$")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it back at once
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + fsync + ``os.replace``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable; not every file system lets a folder be opened
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_stale_temporary(name: str) -> bool:
    """Whether the file ``name`` is a temporary file of ``atomic_write_bytes`` whose writing process no longer runs
    (killed mid-write)."""
    match = _TEMPORARY.match(name)
    return bool(match) and int(match["pid"]) != os.getpid() and not _running(int(match["pid"]))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files of ``atomic_write_bytes`` in ``folder`` whose writing process no longer runs
    (killed mid-write); returns their paths."""
    removed = []
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        if is_stale_temporary(name):
            path = os.path.join(folder, name)
            try:
                os.unlink(path)
                removed.append(path)
            except FileNotFoundError:  # another process cleaned it first
                pass
    return removed
