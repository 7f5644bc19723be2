"""Source bundles: every pinned source a stack and target need, in one file, for air-gapped hosts.

    blackwheel bundle --stack S --target T -o FILE        # where the sources can be had
    blackwheel build vllm --target T --offline --mirror FILE   # where they cannot

Layout: an uncompressed tar (its members are compressed already)::

    bundle.json                  format, stack, target, every source with its pin and tree hash
    archives/<sha256>-<name>     sdists and url archives, named by content
    git/objects.pack             every git object of every pinned commit (submodules too), once

One object database for all repositories deduplicates by content: the CUTLASS trees in vLLM's
resources (its own, flash-attention's ``csrc/cutlass``, DeepGEMM's ``third-party/cutlass``) share
most of their files, which the pack holds once, and git's deltas shrink what differs. No history
is kept: only the objects under each pinned commit.

Opening a bundle (``--mirror FILE``) unpacks it into the cache once and verifies as it goes: each
archive against its sha256, every git object against its id (``git index-pack`` hashes them all),
and every pinned commit's presence. A tree checked out of it is then hashed like any other and
compared with the hash the bundle recorded (and the recipe's, where it has one).
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from . import mirror as stores
from ..core.errors import HashMismatch, SourceError
from ..core.fsutil import atomic_write_json, disk_full, sha256_file, temp_dir_beside, temp_prefix

FORMAT = "blackwheel-source-bundle/1"
PACK = "git/objects.pack"


# ---- writing ---------------------------------------------------------------------------------------
def _git_objects(resolve, url: str, commit: str, spec) -> tuple[list[tuple[Path, str, str]], list[dict]]:
    """(store, commit, url) for a pin and its wanted submodules, and the submodule records."""
    store = resolve(url, commit)
    if store is None:
        raise SourceError(f"{url}@{commit[:12]}: no store holds the commit")
    found, subs = [(store, commit, url)], []
    for path, (sub_url, sub_commit) in stores.wanted_submodules(spec, stores.submodules_at(store, commit)).items():
        inner, _ = _git_objects(resolve, sub_url, sub_commit, False)
        found += inner
        subs.append({"path": path, "url": sub_url, "commit": sub_commit})
    return found, subs


def _tar_gz_size(tree: Path) -> int:
    """What the tree weighs as a separate download (tar.gz, as a release archive would be)."""
    tar = subprocess.Popen(["tar", "-C", str(tree), "-cf", "-", "."], stdout=subprocess.PIPE)
    gz = subprocess.run(["gzip", "-6"], stdin=tar.stdout, capture_output=True, check=True)
    tar.wait()
    return len(gz.stdout)


def write_bundle(sources, fetcher, out: Path, meta: dict) -> dict:
    """Fetch and verify every source, then write one bundle file (atomically). Returns its summary."""
    entries, notes, git_pins = [], [], []
    resolve = fetcher.resolver()
    separate = 0
    for src in sources:
        path, note = fetcher.fetch_optional(src)      # verified: archive sha256, git commit + tree
        if path is None:
            notes.append(note)
            continue
        record = fetcher.record(src)
        if src.kind == "git":
            pins, subs = _git_objects(resolve, src.url, src.commit, src.submodule_spec)
            git_pins += pins
            record["submodule_commits"] = subs
            record["separate_bytes"] = _tar_gz_size(path)
        else:
            record["member"] = f"archives/{src.sha256}-{path.name}"
            record["file"] = path
            record["separate_bytes"] = path.stat().st_size
        separate += record["separate_bytes"]
        entries.append(record)
    with tempfile.TemporaryDirectory(prefix=temp_prefix("bundle"), dir=fetcher.tmp_root()) as tmp:
        pack = Path(tmp) / "objects.pack"
        _write_pack(git_pins, pack, Path(tmp))
        part = out.with_name(f".{out.name}.part")
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            listing = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       **meta, "notes": notes,
                       "commits": sorted({c for _, c, _ in git_pins}),
                       "sources": [{k: v for k, v in e.items() if k != "file"} for e in entries]}
            data = json.dumps(listing, indent=2, sort_keys=True).encode()
            info = tarfile.TarInfo("bundle.json")
            info.size, info.mtime = len(data), int(time.time())
            tar.addfile(info, io.BytesIO(data))
            for e in entries:
                if "member" in e:
                    tar.add(e["file"], arcname=e["member"], recursive=False)
            if git_pins:
                tar.add(pack, arcname=PACK, recursive=False)
        os.replace(part, out)
    size = out.stat().st_size
    return {"bundle": str(out), "bytes": size, "separate_bytes": separate,
            "ratio": round(size / separate, 3) if separate else None,
            "sources": len(entries), "git_objects_from": len({s for s, _, _ in git_pins}), "notes": notes}


def _write_pack(pins: list[tuple[Path, str, str]], pack: Path, tmp: Path) -> None:
    """One pack of every object under the pinned commits, read through alternates of every store."""
    if not pins:
        return
    work = tmp / "objects.git"
    stores.git("init", "-q", "--bare", str(work))
    alternates = sorted({str(Path(store).resolve() / "objects") for store, _, _ in pins})
    (work / "objects" / "info" / "alternates").write_text("\n".join(alternates) + "\n")
    listed: dict[str, str] = {}
    for store, commit, _ in pins:
        out = stores.git("--git-dir", str(store), "rev-list", "--objects", "--no-walk", "--missing=print", commit)
        for line in out.splitlines():
            oid, _, name = line.partition(" ")
            if not oid.startswith("?"):          # absent contents were refused or allowed upstream of here
                listed.setdefault(oid, name)
    lines = "".join(f"{oid} {name}\n" if name else f"{oid}\n" for oid, name in listed.items())
    with open(pack, "wb") as f:
        proc = stores.run_git("--git-dir", str(work), "pack-objects", "--stdout", "--window=50", "--depth=50", "-q",
                              input=lines.encode(), stdout=f, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        raise SourceError(f"git pack-objects failed: {proc.stderr.decode(errors='replace').strip()[-300:]}")


# ---- reading ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OpenedBundle:
    """A bundle unpacked into the cache and verified: its archives by content, one git store."""

    root: Path
    meta: dict

    @property
    def store(self) -> Path:
        return self.root / "objects.git"

    def archive(self, sha256: str) -> Path | None:
        for f in (self.root / "archives").glob(f"{sha256}-*"):
            return f
        return None

    def _source(self, commit: str, submodules) -> dict | None:
        for s in self.meta.get("sources", []):
            if s.get("commit") == commit and s.get("submodules", False) == (submodules or False):
                return s
        return None

    def tree_sha256(self, url: str, commit: str, submodules) -> str | None:
        """The tree hash recorded when the bundle was written, for the same pin."""
        return (self._source(commit, submodules) or {}).get("tree_sha256")

    def absent(self, url: str, commit: str, submodules) -> list[str] | None:
        """Files the bundle's writer accepted as absent (``--allow-absent``), sorted; None if none."""
        found = (self._source(commit, submodules) or {}).get("absent")
        return sorted(found) if found else None


@functools.lru_cache(maxsize=8)
def open_bundle(path: Path, cache: Path) -> OpenedBundle:
    """Unpack ``path`` under ``cache/bundles/<sha256>`` once (verified), or find it unpacked."""
    path = Path(path)
    if not tarfile.is_tarfile(path):
        raise SourceError(f"{path}: not a source bundle (expected the tar that `blackwheel bundle` writes)")
    digest = sha256_file(path)
    root = Path(cache) / "bundles" / digest[:32]
    if (root / "bundle.json").is_file():
        return OpenedBundle(root, json.loads((root / "bundle.json").read_text()))
    tmp = temp_dir_beside(root)
    try:
        meta = _unpack(path, tmp)
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "bundle.json").is_file():
                raise
    except OSError as exc:
        if disk_full(exc):
            raise _no_space(path, root.parent) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"unpacked source bundle {path.name}: {len(meta['sources'])} sources verified", file=sys.stderr)
    return OpenedBundle(root, meta)


def _no_space(path: Path, where: Path) -> SourceError:
    return SourceError(f"no space left on device unpacking source bundle {path.name} into {where}: "
                       "free some space and rerun (nothing half-unpacked was left)")


def _unpack(path: Path, dest: Path) -> dict:
    with tarfile.open(path) as tar:
        try:
            meta = json.load(tar.extractfile("bundle.json"))
        except KeyError:
            raise SourceError(f"{path}: no bundle.json: not a source bundle") from None
        if meta.get("format") != FORMAT:
            raise SourceError(f"{path}: bundle format {meta.get('format')!r}, this blackwheel reads {FORMAT}")
        (dest / "archives").mkdir()
        for s in meta["sources"]:
            if "member" not in s:
                continue
            member = s["member"]
            if not member.startswith(f"archives/{s['sha256']}-") or "/" in member[len("archives/"):]:
                raise SourceError(f"{path}: bad member name {member!r}")
            target = dest / member
            with tar.extractfile(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            actual = sha256_file(target)
            if actual != s["sha256"]:
                raise HashMismatch(f"{path}: {member} has sha256 {actual}, the bundle pins {s['sha256']}")
        store = dest / "objects.git"
        stores.git("init", "-q", "--bare", str(store))
        if meta.get("commits"):
            packed = dest / "objects.pack"
            with tar.extractfile(PACK) as src, open(packed, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            with open(packed, "rb") as pack:
                proc = stores.run_git("--git-dir", str(store), "index-pack", "--stdin",
                                      stdin=pack, capture_output=True)
            packed.unlink()
            if proc.returncode != 0 and b"No space left on device" in proc.stderr:
                raise _no_space(path, dest.parent)      # not a verification failure: say so
            if proc.returncode != 0:       # every object id is recomputed from its bytes here
                raise HashMismatch(f"{path}: the git objects do not verify: "
                                   f"{proc.stderr.decode(errors='replace').strip().splitlines()[-1:]}")
            # no history travels: each pinned commit is a shallow root
            (store / "shallow").write_text("".join(f"{c}\n" for c in meta["commits"]))
            absent = [c for c in meta["commits"] if not stores.has_commit(store, c)]
            if absent:
                raise SourceError(f"{path}: pinned commits missing from the bundle: {', '.join(absent)}")
    atomic_write_json(dest / "bundle.json", meta)
    return meta
