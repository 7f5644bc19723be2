"""A full disk, at seeded points, during source extraction (an sdist through ``safe_extract``, a
source bundle through ``open_bundle``) and during wheel placement (``wheelhouse.place``).

Each trial mounts a small tmpfs made for it, fills it until only ``point x needed`` bytes are free
(``needed``: what an un-faulted run used on the same filesystem), runs the step, and checks: it
either completed with the reference bytes or failed with a one-line BlackwheelError (what
``cli.main`` prints as one line; a bare OSError would be a traceback); nothing but dot-prefixed
temporaries is visible; and after the filler is removed a rerun completes with the reference bytes.
Needs root and ``mount -t tmpfs`` (else a loop-mounted ext2 image); skipped, naming what was refused,
where neither is allowed.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from blackwheel.sources.bundle import open_bundle
from blackwheel.core.errors import BlackwheelError, BuildFailed
from blackwheel.core.fsutil import sha256_file, tree_sha256
from blackwheel.release.provenance import provenance
from blackwheel.sources.fetch import Fetcher, safe_extract
from blackwheel.release.wheelhouse import place
from tests.faults import faultkit as fk

SIZE_K = 24 * 1024          # every step here needs under 12 MiB


def _run(cmd: list[str]) -> str | None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"`{' '.join(cmd)}` refused: {(proc.stderr or proc.stdout).strip()}"


class SmallDisk:
    """A filesystem of SIZE_K KiB at ``where``: tmpfs, else a loop-mounted ext2 image."""

    def __init__(self, where: Path):
        self.where, self.image = where, None

    def mount(self) -> None:
        self.where.mkdir(parents=True, exist_ok=True)
        refused = _run(["mount", "-t", "tmpfs", "-o", f"size={SIZE_K}k", "tmpfs", str(self.where)])
        if refused is None:
            return
        self.image = self.where.with_name(self.where.name + ".img")
        steps = [["truncate", "-s", f"{SIZE_K}k", str(self.image)], ["mkfs.ext2", "-q", "-F", str(self.image)],
                 ["mount", "-o", "loop", str(self.image), str(self.where)]]
        for step in steps:
            also = _run(step)
            if also is not None:
                pytest.skip(f"cannot make a small filesystem: {refused}; {also}")

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.where)], capture_output=True)
        if self.image is not None:
            self.image.unlink(missing_ok=True)

    def free(self) -> int:
        st = os.statvfs(self.where)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> Path:
        """Write a filler so that about ``leave`` bytes stay free."""
        filler = self.where / "filler"
        left = max(0, self.free() - leave)
        with open(filler, "wb") as f:
            try:
                while left > 0:
                    n = min(left, 1 << 20)
                    f.write(b"\0" * n)
                    left -= n
                f.flush()
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        return filler


# ---- the three steps: each takes the small filesystem's root, returns a hash of what it made ------
def _extract(world, disk: Path) -> str:
    archive = Fetcher(world["tmp"] / "disk-cache", world["mirror"], offline=True).fetch(world["sdist"])
    return tree_sha256(safe_extract(archive, disk / "build" / "app"))


def _unpack(world, disk: Path) -> str:
    open_bundle.cache_clear()
    opened = open_bundle(world["bundle"], disk / "cache")
    return sha256_file(opened.root / "bundle.json")


def _place(world, disk: Path) -> str:
    wheel = world["disk_wheel"]
    final = place(wheel, fk.manifest_for(wheel, "s", "t"), disk / "wheelhouse", "s", "t")
    provenance(final)
    return sha256_file(final)


STEPS = {"sdist extraction (safe_extract)": _extract, "bundle unpack (open_bundle)": _unpack,
         "wheel placement (wheelhouse.place)": _place}


def _visible(disk: Path) -> list[str]:
    """Everything a reader could list, less the filler and dot-prefixed temporaries."""
    out = []
    for dirpath, dirnames, filenames in os.walk(disk):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "lost+found"]
        out += [os.path.relpath(os.path.join(dirpath, f), disk) for f in filenames
                if not f.startswith(".") and f != "filler"]
    return sorted(out)


def _dots(disk: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), disk) for d, dirs, files in os.walk(disk)
                  for n in dirs + files if n.startswith("."))


def _problems_of_partial(step: str, disk: Path, visible: list[str]) -> list[str]:
    """What is visible after a failure must be whole: here, for every step, nothing at all."""
    if step.startswith("wheel"):
        problems, _ = fk.check_wheelhouse(disk / "wheelhouse") if (disk / "wheelhouse").is_dir() else ([], [])
        return problems + [f"visible after the failure: {v}" for v in visible if v.endswith(".whl")]
    if step.startswith("bundle"):
        problems, _ = fk.check_cache(disk / "cache") if (disk / "cache").is_dir() else ([], [])
        return problems
    return [f"half-extracted file visible: {v}" for v in visible][:3]


@pytest.fixture(scope="module")
def disk_world(world, tmp_path_factory):
    world = dict(world)
    world["disk_wheel"] = fk.make_wheel(tmp_path_factory.mktemp("diskwheel"), "bw_disk", bulk=4 << 20)
    return world


@pytest.mark.parametrize("step", list(STEPS))
def test_full_disk_fails_in_one_line_leaves_nothing_partial_and_a_rerun_completes(disk_world, step, fault_results,
                                                                                 tmp_path):
    case = f"full disk during {step}"
    rng = random.Random(f"{fk.SEED}:{case}")
    disk = SmallDisk(tmp_path / "disk")
    disk.mount()
    fn = STEPS[step]
    trials, t0 = [], time.monotonic()
    try:
        before = disk.free()
        reference = fn(disk_world, disk.where)
        needed = before - disk.free()
        pts = fk.points(rng)
        for point in pts:
            for _ in range(fk.TRIALS):
                for entry in list(disk.where.iterdir()):
                    if entry.name != "lost+found":
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                leave = int(point * needed)
                filler = disk.fill(leave)
                problems, message = [], None
                try:
                    got = fn(disk_world, disk.where)
                    if got != reference:
                        problems.append(f"completed with other bytes: {got}")
                except BlackwheelError as exc:
                    message = str(exc)
                    if "\n" in message or "no space left" not in message:
                        problems.append(f"not a one-line full-disk error: {message!r}")
                except Exception as exc:  # noqa: BLE001 - a traceback through the CLI is a lost trial
                    message = f"{type(exc).__name__}: {exc}"
                    problems.append(f"not a BlackwheelError (the CLI would print a traceback): {message}")
                visible = _visible(disk.where)
                if message is not None:
                    problems += _problems_of_partial(step, disk.where, visible)
                leftovers = _dots(disk.where)
                filler.unlink()
                try:
                    again = fn(disk_world, disk.where)
                    if again != reference:
                        problems.append(f"rerun gave {again}, the un-faulted run {reference}")
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"rerun after freeing space failed: {type(exc).__name__}: {exc}")
                trials.append({"point": point, "free_bytes": leave, "failed": message is not None,
                               "message": (message or "completed")[:300], "problems": problems,
                               "leftovers": leftovers})
    finally:
        open_bundle.cache_clear()
        disk.unmount()
    lost = [t for t in trials if t["problems"]]
    fault_results(case, seed=fk.SEED, points=pts, needed_bytes=needed, filesystem="tmpfs" if disk.image is None
                  else "ext2 loop", trials=len(trials), failed=sum(t["failed"] for t in trials),
                  survived=len(trials) - len(lost), lost=len(lost),
                  leftover_temporaries=sum(len(t["leftovers"]) for t in trials),
                  seconds=round(time.monotonic() - t0, 2), detail=trials)
    assert not lost, lost[:3]


def test_a_full_disk_in_place_is_a_one_line_error_through_the_cli(tmp_path, monkeypatch, capsys):
    """Found by the case above: ENOSPC while placing a wheel (or extracting) was a bare OSError,
    which ``cli.main`` does not catch (a traceback). Now a one-line BuildFailed / SourceError."""
    import blackwheel.release.wheelhouse as wh

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))
    monkeypatch.setattr(wh.shutil, "copyfile", full)
    wheel = fk.make_wheel(tmp_path / "in", bulk=1 << 10)
    with pytest.raises(BuildFailed, match="no space left on device placing") as info:
        place(wheel, fk.manifest_for(wheel, "s", "t"), tmp_path / "wh", "s", "t")
    assert "\n" not in str(info.value)
    assert [p.name for p in (tmp_path / "wh" / "s" / "t").iterdir()] == []
