"""patch.py: patch headers (the real flash-attn series and made-up ones), applying a series to a small
tree, and the one-line errors naming patch, file and hunk."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from blackwheel.core.errors import PatchError, RecipeError
from blackwheel.core.fsutil import sha256_file
from blackwheel.sources.patch import apply_patch, apply_series, read_header
from blackwheel.core.recipe import Condition, PatchSpec, patches_dir

HEADER = """From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: blackwheel tests <tests@blackwheel.invalid>
Date: Wed, 25 Nov 2026 00:00:00 +0000
Subject: [PATCH] {subject}

Why: a reason that is long enough to
 wrap onto a second line.
Upstream: https://example.invalid/pr/1 (open)
Applies-when: always
---
"""

ORIGINAL = "".join(f"line {i}\n" for i in range(1, 21))

PATCH_ONE = HEADER.format(subject="one: change line 3") + """\
diff --git a/src/file.txt b/src/file.txt
--- a/src/file.txt
+++ b/src/file.txt
@@ -1,6 +1,6 @@
 line 1
 line 2
-line 3
+line three
 line 4
 line 5
 line 6
"""

PATCH_TWO = HEADER.format(subject="two: change line 15") + """\
diff --git a/src/file.txt b/src/file.txt
--- a/src/file.txt
+++ b/src/file.txt
@@ -13,6 +13,6 @@
 line 13
 line 14
-line 15
+line fifteen
 line 16
 line 17
 line 18
"""

PATCH_NEW_FILE = HEADER.format(subject="add a file") + """\
diff --git a/added.txt b/added.txt
new file mode 100644
--- /dev/null
+++ b/added.txt
@@ -0,0 +1 @@
+hello
"""


def write_patches(root: Path, **patches: str) -> list[PatchSpec]:
    """patches/<pkg>/<ver>/<name>.patch as the recipe loader lays them out."""
    folder = root / "patches" / "pkg" / "1.0"
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for name, text in patches.items():
        (folder / f"{name}.patch").write_text(text)
        specs.append(PatchSpec(folder / f"{name}.patch", Condition()))
    return specs


def make_tree(where: Path) -> Path:
    (where / "src").mkdir(parents=True)
    (where / "src" / "file.txt").write_text(ORIGINAL)
    return where


def snapshot(tree: Path) -> dict[str, str]:
    return {str(p.relative_to(tree)): p.read_text() for p in sorted(tree.rglob("*")) if p.is_file()}


# ---- headers -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch", sorted((patches_dir() / "flash-attn").glob("*/*.patch")), ids=lambda p: p.name)
def test_real_flash_attn_headers(patch):
    h = read_header(patch)
    assert h.subject.startswith("setup.py:")
    assert "https://" in h.fields["Upstream"] or "none" in h.fields["Upstream"]
    assert h.fields["Why"] and h.fields["Applies-when"]
    assert "\n" not in h.fields["Why"]          # continuation lines are joined


def test_flash_attn_0001_header_in_detail():
    h = read_header(patches_dir() / "flash-attn" / "2.8.3.post2" / "0001-honour-sm12x-and-suffixed-archs.patch")
    assert h.subject == "setup.py: honour 121, family (f) and arch-specific (a)"  # first line of the subject
    assert "issues/1969" in h.fields["Upstream"] and "pull/2257" in h.fields["Upstream"]
    assert h.fields["Applies-when"].startswith("flash-attn 2.8.3.post2")


def test_multiline_field_is_joined(tmp_path):
    (spec,) = write_patches(tmp_path, **{"0001-one": PATCH_ONE})
    h = read_header(spec.file)
    assert h.subject == "one: change line 3"
    assert h.fields["Why"] == "a reason that is long enough to wrap onto a second line."


@pytest.mark.parametrize("drop", ["Why: ", "Upstream: ", "Applies-when: ", "Subject: "])
def test_header_missing_a_field(tmp_path, drop):
    text = "".join(ln for ln in PATCH_ONE.splitlines(keepends=True) if not ln.startswith(drop))
    (spec,) = write_patches(tmp_path, **{"0001-one": text})
    with pytest.raises(RecipeError, match=f"0001-one.patch: header lacks {drop.rstrip(': ')}"):
        read_header(spec.file)


# ---- applying ------------------------------------------------------------------------------------------
def test_apply_series_in_order(tmp_path):
    specs = write_patches(tmp_path, **{"0001-one": PATCH_ONE, "0002-two": PATCH_TWO, "0003-new": PATCH_NEW_FILE})
    tree = make_tree(tmp_path / "tree")
    entries = apply_series(specs, tree)
    text = (tree / "src" / "file.txt").read_text()
    assert "line three\n" in text and "line fifteen\n" in text and "line 3\n" not in text
    assert (tree / "added.txt").read_text() == "hello\n"
    assert [e["file"] for e in entries] == ["patches/pkg/1.0/0001-one.patch", "patches/pkg/1.0/0002-two.patch",
                                           "patches/pkg/1.0/0003-new.patch"]
    assert entries[0]["sha256"] == sha256_file(specs[0].file)
    assert entries[0]["subject"] == "one: change line 3" and entries[0]["when"] == "always"
    assert entries[0]["upstream"].startswith("https://example.invalid/pr/1")


def test_check_mode_leaves_the_tree_unchanged(tmp_path):
    specs = write_patches(tmp_path, **{"0001-one": PATCH_ONE, "0003-new": PATCH_NEW_FILE})
    tree = make_tree(tmp_path / "tree")
    before = snapshot(tree)
    assert len(apply_series(specs, tree, check=True)) == 2
    assert snapshot(tree) == before


def test_a_patch_that_does_not_apply_names_patch_file_and_hunk(tmp_path):
    specs = write_patches(tmp_path, **{"0001-one": PATCH_ONE, "0002-two": PATCH_TWO})
    tree = make_tree(tmp_path / "tree")
    (tree / "src" / "file.txt").write_text(ORIGINAL.replace("line 15\n", "line 15 moved upstream\n"))
    with pytest.raises(PatchError) as exc:
        apply_series(specs, tree)
    msg = str(exc.value)
    assert "0002-two.patch" in msg and "src/file.txt" in msg and "@@ -13,6 +13,6 @@" in msg
    assert "\n" not in msg


def test_a_patch_applied_twice_fails(tmp_path):
    (spec,) = write_patches(tmp_path, **{"0001-one": PATCH_ONE})
    tree = make_tree(tmp_path / "tree")
    apply_patch(spec.file, tree)
    with pytest.raises(PatchError, match=r"0001-one.patch does not apply: src/file.txt, @@ -1,6 \+1,6 @@"):
        apply_patch(spec.file, tree)


def test_missing_file_names_it(tmp_path):
    (spec,) = write_patches(tmp_path, **{"0001-one": PATCH_ONE})
    tree = tmp_path / "tree"
    tree.mkdir()
    with pytest.raises(PatchError, match="0001-one.patch does not apply: src/file.txt is missing"):
        apply_patch(spec.file, tree)


def test_not_a_patch(tmp_path):
    (spec,) = write_patches(tmp_path, **{"0001-bad": HEADER.format(subject="x") + "garbage\n"})
    with pytest.raises(PatchError, match="0001-bad.patch does not apply"):
        apply_patch(spec.file, make_tree(tmp_path / "tree"))


def test_tree_inside_another_git_repository(tmp_path):
    """Our sources are extracted under the project's repo: git apply must still touch them."""
    outer = tmp_path / "outer"
    outer.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=outer, check=True)
    (spec,) = write_patches(tmp_path, **{"0001-one": PATCH_ONE})
    tree = make_tree(outer / "build" / "pkg-1.0")
    apply_patch(spec.file, tree)
    assert "line three\n" in (tree / "src" / "file.txt").read_text()
