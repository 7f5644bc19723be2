"""Test helpers for publishing: a real pypiserver on 127.0.0.1, and small real wheels with manifests.

``running_pypiserver`` starts the pypiserver installed in the test venv (``python -m pypiserver``) on a
free port with an htpasswd file written here (passlib), waits until its health endpoint answers,
and stops it on exit. Nothing is mocked: uploads go through twine and HTTP to the real server.

Test modules load this file by path (``load_helpers``): its name would shadow the real ``pypiserver``
package if ``tests/`` were ever put on ``sys.path``, which is also why the server is started with
``cwd`` set to its own temporary folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

START_TIMEOUT_S = 20


@dataclass(frozen=True)
class PypiServer:
    url: str             # upload URL (pypiserver takes uploads at its root)
    packages: Path       # the folder it serves
    log: Path

    @property
    def simple_url(self) -> str:
        return self.url + "simple/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    with warnings.catch_warnings():  # passlib imports the stdlib crypt module, deprecated in 3.11
        warnings.simplefilter("ignore", DeprecationWarning)
        from passlib.apache import HtpasswdFile

    ht = HtpasswdFile(str(path), new=True, default_scheme="sha256_crypt")
    for user, password in users.items():
        ht.set_password(user, password)
    ht.save()
    return path


def _wait_until_up(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"pypiserver exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"pypiserver did not answer within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@contextlib.contextmanager
def running_pypiserver(root: Path, users: dict[str, str], authenticate: str = "update") -> Iterator[PypiServer]:
    """A pypiserver serving ``root/packages`` that authenticates ``authenticate`` actions against
    ``users`` (``"update"``: uploads need a user; ``"update,download,list"``: everything does)."""
    root.mkdir(parents=True, exist_ok=True)
    packages = root / "packages"
    packages.mkdir(exist_ok=True)
    htpasswd = write_htpasswd(root / "htpasswd", users)
    port = free_port()
    log = root / "pypiserver.log"
    cmd = [sys.executable, "-m", "pypiserver", "run", "-i", "127.0.0.1", "-p", str(port), "-P", str(htpasswd),
           "-a", authenticate, "--disable-fallback", "--backend", "simple-dir", "--server", "wsgiref", str(packages)]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=root, stdout=log_file, stderr=subprocess.STDOUT)
    server = PypiServer(url=f"http://127.0.0.1:{port}/", packages=packages, log=log)
    try:
        _wait_until_up(server.url, proc, log)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving_folder(folder: Path, log: Path) -> Iterator[str]:
    """A plain static HTTP server (``python -m http.server``) for ``folder``; yields its base URL."""
    port = free_port()
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                                cwd=folder, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"http.server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# ---- wheels --------------------------------------------------------------------------------------
_BUILT: dict[tuple, Path] = {}  # one build per distinct wheel per test session (~2 s each)


def build_wheel(workdir: Path, name: str, version: str, value: int, requires_python: str = ">=3.9") -> Path:
    """A pure-python wheel built by setuptools from a tiny project (``import <name>`` gives VALUE).
    Tests must copy it (``place``) before changing anything: the file is shared."""
    key = (name, version, value, requires_python)
    if key not in _BUILT or not _BUILT[key].is_file():
        _BUILT[key] = _build(workdir, name, version, value, requires_python)
    return _BUILT[key]


def _build(workdir: Path, name: str, version: str, value: int, requires_python: str) -> Path:
    module = name.replace("-", "_")
    project = workdir / f"{module}-{value}-src"
    (project / module).mkdir(parents=True)
    (project / module / "__init__.py").write_text(f"VALUE = {value}\n")
    (project / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{name}"
        version = "{version}"
        requires-python = "{requires_python}"

        [tool.setuptools]
        packages = ["{module}"]
        """))
    dist = workdir / f"dist-{module}-{value}"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(project)],
                   check=True, capture_output=True, cwd=workdir)
    (wheel,) = dist.glob("*.whl")
    return wheel


def write_manifest(wheel: Path, *, verify_ok: bool = True, stack: str = "cu130-torch2.11",
                   target: str = "gb10") -> Path:
    """The manifest the build stage would write beside ``wheel``."""
    name, version = wheel.name.split("-")[:2]
    manifest = {
        "schema": "blackwheel.manifest/1", "package": name.replace("_", "-"),
        "dist_name": name.replace("_", "-"), "version": version,
        "wheel": wheel.name, "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
        "wheel_size": wheel.stat().st_size, "stack": stack, "target": target,
        "sources": [
            {"name": name, "kind": "pypi", "url": f"https://files.example/{name}-1.0.tar.gz", "version": "1.0",
             "commit": None, "sha256": "ab" * 32, "role": "sdist"},
            {"name": "cutlass", "kind": "git", "url": "https://github.com/NVIDIA/cutlass.git", "version": "v4.2.1",
             "commit": "c0ffee" * 6 + "abcd", "sha256": None, "role": "resource"},
        ],
        "patches": [{"file": f"patches/{name}/1.0/0001-Add-sm121.patch", "sha256": "cd" * 32,
                     "upstream": "https://github.com/Dao-AILab/flash-attention/pull/2257"}],
        "toolchain": {"nvcc": "13.0.88", "host_compiler": "gcc 12.2.0", "torch": "2.11.0+cu130"},
        "arch": {"knob": "FLASH_ATTN_CUDA_ARCHS", "value": "121", "archs": ["12.1"]},
        "verify": {"ok": verify_ok}, "build": {"seconds": 1},
    }
    path = wheel.with_name(wheel.name + ".manifest.json")
    path.write_text(json.dumps(manifest, indent=2))
    return path


def place(wheel: Path, wheelhouse: Path, stack: str = "cu130-torch2.11", target: str = "gb10",
          verify_ok: bool = True) -> Path:
    """Copy ``wheel`` into ``wheelhouse/<stack>/<target>/`` with a manifest, as the build stage does."""
    where = wheelhouse / stack / target
    where.mkdir(parents=True, exist_ok=True)
    dest = where / wheel.name
    dest.write_bytes(wheel.read_bytes())
    write_manifest(dest, verify_ok=verify_ok, stack=stack, target=target)
    return dest


def fresh_venv_install(venv_dir: Path, index_url: str, requirement: str) -> subprocess.CompletedProcess:
    """``pip install`` into a new venv from ``index_url`` only (no pip config, no other index)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    env = {"PATH": "/usr/bin:/bin", "PIP_CONFIG_FILE": "/dev/null", "HOME": str(venv_dir)}
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv_dir / "bin" / "python"), "install", "--no-input",
         "--disable-pip-version-check", "--index-url", index_url, requirement],
        env=env, capture_output=True, text=True)
