"""Small file helpers: hashing and atomic writes (a reader never sees a half-written file)."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def tree_sha256(root: str | os.PathLike) -> str:
    """Content hash of a source tree, independent of git and of file times.

    sha256 over sorted lines ``<kind> <path>\\0<digest>\\n`` where kind is ``f`` (file), ``x``
    (executable file) or ``l`` (symlink, digest = link target); ``.git`` entries are skipped, empty
    folders do not count.
    """
    root = Path(root)
    entries: list[bytes] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".git"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = path.relative_to(root).as_posix()
            if stat.S_ISLNK(st.st_mode):
                entries.append(f"l {rel}\0{os.readlink(path)}\n".encode())
            elif stat.S_ISREG(st.st_mode) and name != ".git":
                kind = "x" if st.st_mode & 0o111 else "f"
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries.append(f"{kind} {rel}\0{digest}\n".encode())
    h = hashlib.sha256()
    for line in sorted(entries):
        h.update(line)
    return h.hexdigest()


def record_hash(data: bytes) -> str:
    """A wheel RECORD line's hash of ``data``: ``sha256=`` and urlsafe base64 without padding."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def disk_full(exc: BaseException) -> bool:
    """True for the OSError of a full disk (or an exhausted quota)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path``, with the mode a plain open() would give (not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextmanager
def flocked(folder: str | os.PathLike, on_wait: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``folder`` itself (made if missing; no lock file is left
    behind); yields whether another holder had to be waited for. ``on_wait`` is called once,
    before waiting. The kernel drops the lock when its holder dies, even by SIGKILL. Where the
    filesystem cannot lock a folder (NFS emulates flock with write locks: EBADF), nothing is held."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            waited = False
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fd, fcntl.LOCK_EX)
            waited = True
        except OSError as exc:
            if exc.errno not in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            waited = False
        yield waited
    finally:
        os.close(fd)
