"""Shared pieces of the fault tests: small real inputs (git repositories, a mirror, an sdist, a bundle,
a wheel), a subprocess driver killed with SIGKILL at seeded points, and the checks a cache, a
wheelhouse and a static index must pass after any fault.

Real builds (the light generated CUDA extension of tests/cuda_ext.py, through ``blackwheel build``)
take seconds each: those cases run ``BUILD_TRIALS`` trials in all, each at its own seeded point.

Knobs (environment):
    BLACKWHEEL_FAULT_TRIALS   trials per fault point (default 3; the full run uses 20); real-build
                              cases: trials in all (default 1 when the variable is unset)
    BLACKWHEEL_FAULT_POINTS   fault points drawn per case (default 3)
    BLACKWHEEL_FAULT_SEED     the seed of every case's generator (default 1969)
    BLACKWHEEL_FAULTS_OUT     folder for faults.json (default: a pytest tmp folder)
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from tests.redisserver import start_redis  # noqa: F401  (fk.start_redis in the fault cases)
from dataclasses import asdict
from pathlib import Path

from blackwheel.core.fsutil import sha256_file, tree_sha256
from blackwheel.sources.fetch import Source
from tests import gitworld

ROOT = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("BLACKWHEEL_FAULT_TRIALS", "3"))
POINTS = int(os.environ.get("BLACKWHEEL_FAULT_POINTS", "3"))
SEED = int(os.environ.get("BLACKWHEEL_FAULT_SEED", "1969"))
BUILD_TRIALS = TRIALS if "BLACKWHEEL_FAULT_TRIALS" in os.environ else 1

def make_world(tmp: Path) -> dict:
    """tests/gitworld.py's world, with some bulk so a fetch takes measurable time."""
    return gitworld.make_world(tmp, bulk=True, blob_bytes=4 << 20)


def source_json(src: Source) -> dict:
    d = asdict(src)
    d["submodule_paths"] = list(d["submodule_paths"])
    return d


def source_from_json(d: dict) -> Source:
    return Source(**{**d, "submodule_paths": tuple(d["submodule_paths"])})


# ---- a driver in its own process, killed at a point ------------------------------------------------
def driver_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def start(code: str, args: dict) -> subprocess.Popen:
    """Start ``python -c code`` (it prints ``ready`` once imported, then works); returns once ready."""
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=driver_env(), start_new_session=True)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        out, err = proc.communicate()
        raise AssertionError(f"driver did not start: {line}{out}{err}")
    return proc


def rest_of_output(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """What the driver printed after ``ready``. Not ``communicate()``: it reads the pipe itself and
    loses whatever the text wrapper already buffered behind the ``ready`` line (a quick driver's
    whole answer)."""
    proc.wait(timeout=timeout)
    return proc.stdout.read(), proc.stderr.read()


def finish(proc: subprocess.Popen, timeout: float = 120) -> dict:
    out, err = rest_of_output(proc, timeout)
    if proc.returncode != 0:
        raise AssertionError(f"driver failed ({proc.returncode}): {err[-2000:]}")
    return json.loads(out.strip().splitlines()[-1])


def timed_run(code: str, args: dict) -> tuple[dict, float]:
    """One un-killed run: its result and how long its work took (from ``ready`` to exit)."""
    proc = start(code, args)
    t0 = time.monotonic()
    result = finish(proc)
    return result, time.monotonic() - t0


def kill_after(code: str, args: dict, delay: float) -> bool:
    """Run the driver and SIGKILL its whole process group (git children too) ``delay`` s after it is
    ready. True if it was killed, False if it had finished first."""
    proc = start(code, args)
    try:
        proc.wait(timeout=delay)
        proc.communicate()
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return True


def points(rng, n: int = POINTS) -> list[float]:
    """Fault points as fractions of an un-killed run's duration."""
    return sorted(round(rng.random(), 4) for _ in range(n))


# ---- what must hold after a fault --------------------------------------------------------------------
def check_cache(cache: Path) -> tuple[list[str], list[str]]:
    """(problems, leftovers) of a cache after a fault. A problem is something a reader could take:
    a visible archive with other bytes, a tree without its record or not matching it, an unpacked
    bundle without bundle.json. Leftovers are dot-prefixed temporaries (never read)."""
    problems, leftovers = [], []
    for folder in sorted((cache / "sources" / "sha256").glob("*")):
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                leftovers.append(str(f.relative_to(cache)))
            elif sha256_file(f) != folder.name:
                problems.append(f"visible archive {f.relative_to(cache)} does not hash to its folder name")
    git_root = cache / "sources" / "git"
    for tree in sorted(git_root.glob("*")) if git_root.is_dir() else []:
        if tree.name.startswith("."):
            leftovers.append(str(tree.relative_to(cache)))
        elif tree.is_dir():
            record = tree.with_name(tree.name + ".json")
            if not record.is_file():
                problems.append(f"tree {tree.relative_to(cache)} has no record")
            elif json.loads(record.read_text())["tree_sha256"] != tree_sha256(tree):
                problems.append(f"tree {tree.relative_to(cache)} differs from its record")
        elif tree.suffix == ".json":
            json.loads(tree.read_text())   # a half-written record would raise here
    for root in sorted((cache / "bundles").glob("*")):
        if root.name.startswith("."):
            leftovers.append(str(root.relative_to(cache)))
        elif not (root / "bundle.json").is_file():
            problems.append(f"unpacked bundle {root.relative_to(cache)} has no bundle.json")
    for tmp in sorted((cache / "tmp").glob("*")):
        leftovers.append(str(tmp.relative_to(cache)))
    return problems, leftovers


def make_wheel(where: Path, name: str = "bw_fault", version: str = "1.0+cu130.sm121", value: int = 1,
               bulk: int = 6 << 20) -> Path:
    """A small valid pure-python wheel (METADATA, WHEEL, RECORD) with ``bulk`` random bytes in it."""
    where.mkdir(parents=True, exist_ok=True)
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    members = {
        f"{name}/__init__.py": f"VALUE = {value}\n".encode(),
        f"{name}/blob.bin": os.urandom(bulk),
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
                            f"Requires-Python: >=3.9\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: blackwheel-faults\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},"
                     f"{len(d)}\n" for n, d in members.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zf:
        for n, d in members.items():
            zf.writestr(n, d)
        zf.writestr(f"{info}/RECORD", record)
    return wheel


def manifest_for(wheel: Path, stack: str, target: str) -> dict:
    """What the build stage hands ``wheelhouse.place`` (place adds wheel, sha256 and size)."""
    name, version = wheel.name.split("-")[:2]
    return {"package": name.replace("_", "-"), "version": version, "stack": stack, "target": target,
            "build_key": "k" * 16, "sources": [{"name": name, "kind": "pypi", "version": "1.0",
                                                "sha256": "ab" * 32, "role": "sdist"}],
            "patches": [], "toolchain": {"nvcc": "13.0.88"}, "verify": {"ok": True}}


def check_wheelhouse(root: Path) -> tuple[list[str], list[str]]:
    """(problems, leftovers): every visible wheel has a manifest describing its bytes; orphan
    manifests and dot temporaries are leftovers (no reader lists them)."""
    from blackwheel.release.manifest import SUFFIX as MANIFEST_SUFFIX
    from blackwheel.release.manifest import checked_manifest
    from blackwheel.core.errors import PublishError

    problems, leftovers = [], []
    leftovers += [str(p.relative_to(root)) for p in root.glob(".*")]     # e.g. an index being written
    for folder in sorted(p for p in root.glob("*/*") if p.is_dir() and not p.parts[-2].startswith(".")
                         and p.parts[-2] != "index"):
        for f in sorted(folder.iterdir()):
            if f.name.startswith("."):
                leftovers.append(str(f.relative_to(root)))
            elif f.name.endswith(".whl"):
                manifest = f.with_name(f.name + MANIFEST_SUFFIX)
                if not manifest.is_file():
                    problems.append(f"wheel {f.name} visible without its manifest")
                    continue
                try:
                    checked_manifest(f, sha256_file(f), manifest)
                except PublishError as exc:
                    problems.append(str(exc))
            elif f.name.endswith(MANIFEST_SUFFIX) and not f.with_name(f.name[: -len(MANIFEST_SUFFIX)]).is_file():
                leftovers.append(f"orphan manifest {f.relative_to(root)}")
    return problems, leftovers


def check_index(out: Path) -> list[str]:
    """An index that is absent, or whole: every page's file exists with the hash and size it lists,
    the metadata file hashes as listed, and the manifest beside agrees with the wheel."""
    if not out.exists():
        return []
    problems = []
    top = out / "simple" / "index.json"
    if not top.is_file():
        return [f"{out} exists without simple/index.json"]
    for project in json.loads(top.read_text())["projects"]:
        from packaging.utils import canonicalize_name
        page = json.loads((out / "simple" / canonicalize_name(project["name"]) / "index.json").read_text())
        for entry in page["files"]:
            f = out / "files" / entry["filename"]
            if not f.is_file():
                problems.append(f"index lists {entry['filename']} but files/ lacks it")
                continue
            if sha256_file(f) != entry["hashes"]["sha256"] or f.stat().st_size != entry["size"]:
                problems.append(f"files/{f.name} differs from the hash or size its page lists")
            meta = f.with_name(f.name + ".metadata")
            if hashlib.sha256(meta.read_bytes()).hexdigest() != entry["core-metadata"]["sha256"]:
                problems.append(f"files/{meta.name} differs from its listed hash")
            manifest = f.with_name(f.name + ".manifest.json")
            if manifest.is_file() and json.loads(manifest.read_text())["wheel_sha256"] != entry["hashes"]["sha256"]:
                problems.append(f"files/{manifest.name} describes other bytes than the indexed wheel")
    return problems


# ---- real builds: ``blackwheel build`` of the light generated extension, in its own session ----------
TOKEN_ENV = "BW_FAULT_TOKEN"   # in the environment of everything a build starts: its sccache server too


def build_env(proj, where: Path, token: str, cache_url: str, workdir: Path | None = None) -> dict:
    """The environment of a ``blackwheel build`` of ``proj`` (tests/cuda_ext.py) with everything in ``where``."""
    return {**driver_env(), "BLACKWHEEL_RECIPES": str(proj.recipes), "BLACKWHEEL_PATCHES": str(proj.patches),
            "BLACKWHEEL_MIRROR": str(proj.mirror), "BLACKWHEEL_OFFLINE": "1",
            "BLACKWHEEL_CACHE": str(where / "cache"), "BLACKWHEEL_WHEELHOUSE": str(where / "wheelhouse"),
            "BLACKWHEEL_WORKDIR": str(workdir or where / "work"), "BLACKWHEEL_CACHE_URL": cache_url,
            "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda"), TOKEN_ENV: token}


class Build:
    """``blackwheel build bw-saxpy --target gb10 --stack test`` in its own session; a thread per pipe
    collects the lines with the time each arrived (seconds after start)."""

    def __init__(self, env: dict, target: str = "gb10"):
        from tests import cuda_ext

        self.target = target
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "blackwheel.cli", "build", cuda_ext.NAME, "--target",
                                      target, "--stack", "test"], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.out: list[tuple[float, str]] = []
        self.err: list[tuple[float, str]] = []
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(pipe, lines), daemon=True)
                         for pipe, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    def _read(self, pipe, lines) -> None:
        for line in pipe:
            with self._changed:
                lines.append((time.monotonic() - self.t0, line.rstrip("\n")))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_line(self, text: str, timeout: float = 300) -> float | None:
        """When a stderr line containing ``text`` came (s after start); None if the build ended first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                hit = next((t for t, line in self.err if text in line), None)
                if hit is not None:
                    return hit
                if not self._readers[1].is_alive() or time.monotonic() > deadline:
                    return None
                self._changed.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def kill(self) -> bool:
        """SIGKILL the build's whole session (not the sccache server: it leaves the session). True if
        the build was still running."""
        if self.proc.poll() is not None:
            return False
        os.killpg(self.proc.pid, signal.SIGKILL)
        return True

    def finish(self, timeout: float = 900) -> int:
        self.proc.wait(timeout=timeout)
        for t in self._readers:
            t.join(timeout=30)
        self.wall_s = time.monotonic() - self.t0
        return self.proc.returncode

    @property
    def stderr(self) -> str:
        return "\n".join(line for _, line in self.err)

    @property
    def stdout(self) -> str:
        return "\n".join(line for _, line in self.out)


def token_processes(token: str) -> dict[int, str]:
    """Processes started under ``token`` (found by their environment): pid -> command name, with
    ``sccache-server`` for a server."""
    marker, found = f"{TOKEN_ENV}={token}".encode(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            if marker in environ:
                comm = (entry / "comm").read_text().strip()
                found[int(entry.name)] = "sccache-server" if b"SCCACHE_START_SERVER=1" in environ else comm
        except OSError:
            continue
    return found


def end_token_processes(token: str) -> None:
    """End what a trial left running (the test's own processes, by pid)."""
    from blackwheel.toolchain.interrupt import end_processes

    end_processes(lambda: token_processes(token))


def check_built(root: Path, stack: str = "test", target: str = "gb10") -> tuple[list[str], Path | None]:
    """(problems, the wheel): the wheelhouse is whole (``check_wheelhouse``), holds exactly one wheel
    for the stack and target, its manifest says it verified, ``provenance`` accepts it and the wheel
    verifies again for the target."""
    from blackwheel.release.provenance import provenance
    from blackwheel.core.targets import TARGETS
    from blackwheel.check.verify import verify_wheel

    problems, _ = check_wheelhouse(root)
    wheels = sorted((root / stack / target).glob("*.whl"))
    if len(wheels) != 1:
        return problems + [f"{len(wheels)} wheels in the wheelhouse: {[w.name for w in wheels]}"], None
    wheel = wheels[0]
    try:
        provenance(wheel)
        manifest = json.loads(wheel.with_name(wheel.name + ".manifest.json").read_text())
        if not manifest["verify"]["ok"]:
            problems.append("the manifest says the wheel did not verify")
        if not verify_wheel(wheel, TARGETS[target]).ok:
            problems.append("the wheel does not verify for its target")
    except Exception as exc:  # noqa: BLE001 - any refusal is a problem of the trial
        problems.append(f"{type(exc).__name__}: {exc}")
    return problems, wheel
