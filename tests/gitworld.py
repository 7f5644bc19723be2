"""Small real git repositories for fetch, bundle and fault tests: a mirror with ``o/lib`` and
``o/app`` (lib as submodule ``third_party/lib`` of app, and a big header both carry), an sdist in
the mirror, and the ``Source`` objects that pin them. Plain functions, shared by tests/test_bundle.py
and tests/faults/."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
from pathlib import Path

from blackwheel.core.fsutil import sha256_file
from blackwheel.sources.fetch import Source

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "init.defaultBranch=main",
       "-c", "protocol.file.allow=always"]
SHARED = "".join(f"// a header line both repositories carry, {i}\n" for i in range(400))


def git(*args: str, cwd: Path) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def repo(root: Path, name: str, files: dict[str, str], message: str | None = None) -> str:
    """A fresh work repository ``root/work-<name>`` with one commit of ``files``; its commit id."""
    work = root / f"work-{name}"
    work.mkdir(parents=True)
    git("init", "-q", cwd=work)
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    git("add", ".", cwd=work)
    git("commit", "-qm", message or name, cwd=work)
    return git("rev-parse", "HEAD", cwd=work)


def make_world(tmp: Path, bulk: bool = False, blob_bytes: int = 0) -> dict:
    """The mirror, the sdist and their pins; ``bulk`` and ``blob_bytes`` add weight, so that a fetch
    takes measurable time (fault tests kill it part-way)."""
    extra = {f"gen/part{i:02d}.h": "".join(f"// generated {i}.{j} {hashlib.sha256(f'{i}{j}'.encode()).hexdigest()}\n"
                                             for j in range(300)) for i in range(40)} if bulk else {}
    lib_commit = repo(tmp, "lib", {"include/big.h": SHARED, "lib.h": "int lib;\n", **extra})
    app = tmp / "work-app"
    app.mkdir()
    git("init", "-q", cwd=app)
    files = {"src/app.c": "int main(void){return 0;}\n", "vendor/big.h": SHARED,
             ".gitmodules": '[submodule "lib"]\n\tpath = third_party/lib\n\turl = https://github.com/o/lib\n'}
    for rel, text in files.items():
        (app / rel).parent.mkdir(parents=True, exist_ok=True)
        (app / rel).write_text(text)
    git("add", ".", cwd=app)
    git("update-index", "--add", "--cacheinfo", f"160000,{lib_commit},third_party/lib", cwd=app)
    git("commit", "-qm", "app", cwd=app)
    app_commit = git("rev-parse", "HEAD", cwd=app)
    (app / "src/app.c").write_text("int main(void){return 1;}\n")
    git("commit", "-qam", "later", cwd=app)                   # the pin is not the tip
    mirror = tmp / "mirror"
    for name in ("lib", "app"):
        dest = mirror / "git" / "github.com" / "o" / f"{name}.git"
        dest.parent.mkdir(parents=True, exist_ok=True)
        git("clone", "-q", "--mirror", str(tmp / f"work-{name}"), str(dest), cwd=tmp)
    (mirror / "pypi").mkdir()
    sdist_dir = tmp / "sdist" / "app-1.0"
    sdist_dir.mkdir(parents=True)
    (sdist_dir / "setup.py").write_text("# app\n")
    if blob_bytes:
        (sdist_dir / "blob.bin").write_bytes(os.urandom(blob_bytes))
    archive = mirror / "pypi" / "app-1.0.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(sdist_dir, arcname="app-1.0")
    return {
        "tmp": tmp, "mirror": mirror, "lib_commit": lib_commit, "app_commit": app_commit,
        "sdist": Source("app", "pypi", sha256_file(archive), pypi="app", version="1.0"),
        "app": Source("app-src", "git", "", url="https://github.com/o/app", commit=app_commit,
                      submodules=True, submodule_paths=("third_party/lib",), role="resource", env="APP_SRC_DIR"),
        "lib": Source("lib", "git", "", url="https://github.com/o/lib.git", commit=lib_commit, role="resource"),
        "extra": Source("extra", "url", "unpinned: upstream pins a tag", url="https://x.invalid/extra.tgz",
                        role="resource", env="EXTRA_DIR", optional="the wheel lacks extra"),
    }
