"""Small file helpers: hashing and atomic writes (a reader never sees a half-written file)."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from . import procs

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


# Temporaries carry their writer's pid and start time (".NAME.bw<pid>_<start>.<random>"), so that
# what a killed writer left behind is known as such and swept by the next writer in that folder.
OWNED = re.compile(r"\.bw(\d+)_(\d+)\.")


def temp_prefix(name: str) -> str:
    """The prefix of a temporary for ``name``: hidden, and marked with this process."""
    pid, start = procs.me()
    return f".{name}.bw{pid}_{start}."


def sweep_temporaries(folder: str | os.PathLike) -> list[str]:
    """Remove the temporaries in ``folder`` whose writer no longer runs (killed before it could
    clean up); returns their names. Another process's live temporaries, and anything unmarked,
    stay. Never read by anything, they would only pile up."""
    gone = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return gone
    for entry in entries:
        owner = OWNED.search(entry.name) if entry.name.startswith(".") else None
        if owner is None or procs.running(int(owner.group(1)), int(owner.group(2))):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            gone.append(entry.name)
        except FileNotFoundError:   # another sweeper was first
            pass
    return gone


def _temp_beside(path: Path) -> tuple[int, str]:
    """A temporary file next to ``path``, with the mode a plain open() would give (not mkstemp's 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".part", dir=path.parent)
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


def temp_dir_beside(path: str | os.PathLike, suffix: str = "") -> Path:
    """A marked temporary folder next to ``path`` (after sweeping the orphans there), to be renamed
    into place when whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path.parent)
    return Path(tempfile.mkdtemp(prefix=temp_prefix(path.name), suffix=suffix, dir=path.parent))
