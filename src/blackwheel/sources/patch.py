"""Patches: our numbered series per package version, applied in order to an extracted source tree.

Each patch is a ``git format-patch`` file ``NNNN-name.patch`` whose message carries a header::

    Why: ...
    Upstream: <issue or PR link> (<status>)
    Applies-when: ...

A patch that does not apply stops the build naming the patch, the file and the hunk.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import PatchError, RecipeError
from ..core.fsutil import sha256_file
from .fetch import safe_extract
from .mirror import run_git

HEADER_FIELDS = ("Why", "Upstream", "Applies-when")
_FAILED = re.compile(r"patch failed: (?P<file>.+?):(?P<line>\d+)")
_NOT_FOUND = re.compile(r"error: (?P<file>.+?): (?:No such file|does not exist)")


@dataclass(frozen=True)
class PatchHeader:
    subject: str
    fields: dict[str, str]


def read_header(path: Path) -> PatchHeader:
    """Subject and the Why / Upstream / Applies-when fields of a format-patch file."""
    text = path.read_text(encoding="utf-8", errors="replace")
    head = text.split("\ndiff --git", 1)[0]
    subject = ""
    m = re.search(r"^Subject: (?:\[PATCH[^\]]*\] )?(.+)$", head, re.MULTILINE)
    if m:
        subject = m.group(1).strip()
    fields: dict[str, str] = {}
    for name in HEADER_FIELDS:
        fm = re.search(rf"^{name}:\s*(.+(?:\n(?![A-Z][\w-]+:|---\n).+)*)", head, re.MULTILINE)
        if fm:
            fields[name] = " ".join(fm.group(1).split())
    missing = [f for f in HEADER_FIELDS if f not in fields]
    if not subject or missing:
        raise RecipeError(f"patch {path.name}: header lacks {', '.join(missing) or 'Subject'} "
                          f"(every patch says Why, Upstream and Applies-when)")
    return PatchHeader(subject, fields)


def _hunk_at(patch: Path, file: str, line: int) -> str:
    """The hunk header of ``file`` in ``patch`` whose old range starts at ``line``."""
    current = None
    for text in patch.read_text(errors="replace").splitlines():
        if text.startswith("+++ "):
            current = text[4:].split("/", 1)[-1] if text[4:].startswith(("a/", "b/")) else text[4:]
        elif text.startswith("@@") and current == file:
            m = re.match(r"@@ -(\d+)", text)
            if m and int(m.group(1)) == line:
                return text.split(" @@")[0] + " @@"
    return f"the hunk at line {line}"


def _git_apply(patch: Path, tree: Path, check: bool) -> subprocess.CompletedProcess:
    args = ["apply", "-p1", "--whitespace=nowarn"] + (["--check"] if check else [])
    # GIT_DIR pointing nowhere: the tree may sit inside another repository (ours), which must not
    # make git apply silently skip paths outside it.
    return run_git(*args, str(patch.resolve()), cwd=tree, capture_output=True, text=True,
                   env={"GIT_DIR": str(tree / ".no-git"), "PATH": "/usr/bin:/bin"})


def apply_patch(patch: Path, tree: Path, check: bool = False) -> None:
    proc = _git_apply(patch, tree, check)
    if proc.returncode == 0:
        return
    err = proc.stderr
    m = _FAILED.search(err)
    if m:
        hunk = _hunk_at(patch, m.group("file"), int(m.group("line")))
        raise PatchError(f"patch {patch.name} does not apply: {m.group('file')}, {hunk}")
    m = _NOT_FOUND.search(err)
    if m:
        raise PatchError(f"patch {patch.name} does not apply: {m.group('file')} is missing")
    last = (err.strip().splitlines() or ["(no message)"])[-1]
    raise PatchError(f"patch {patch.name} does not apply: {last}")


def apply_series(patches, tree: Path, check: bool = False) -> list[dict]:
    """Apply ``PatchSpec``s in order; returns their manifest entries (file, sha256, header)."""
    applied = []
    for spec in patches:
        header = read_header(spec.file)
        apply_patch(spec.file, tree, check=check)
        applied.append({
            "file": "patches/" + "/".join(spec.file.parts[-3:]),
            "sha256": sha256_file(spec.file),
            "subject": header.subject,
            "upstream": header.fields["Upstream"],
            "when": str(spec.when),
        })
    return applied


# ---- every patch of a stack against its pinned source ----------------------------------------------
def check_stack_patches(stack, fetcher, workdir: Path) -> list[str]:
    """Apply each recipe's patches (all targets) to a fresh extraction of its pinned sdist."""
    lines = []
    for recipe in stack.recipes():
        rv = recipe.version(stack.pins[recipe.name])
        wanted = [p for p in rv.patches if p.when.torch is None or p.when.holds_torch(stack.torch)]
        if not wanted:
            lines.append(f"{stack.name}: {recipe.name} {rv.version}: no patches")
            continue
        tree = safe_extract(fetcher.fetch(rv.sdist), workdir / stack.name / recipe.name)
        apply_series(wanted, tree)
        lines.append(f"{stack.name}: {recipe.name} {rv.version}: {len(wanted)} patch(es) apply")
    return lines
