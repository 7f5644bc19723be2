"""Longest compile units first, unit times from ``.ninja_log``, and a build profile.

What ninja does with times (checked by experiment with ninja 1.13.2 and 1.11.1, see
tests/test_ninja.py): ninja >= 1.12 orders ready edges by *critical path weight*, but every
non-phony edge weighs 1 (``EdgeWeightHeuristic`` in build.cc); ties go to the edge declared
first. Times in ``.ninja_log`` do **not** change the order. So flash-attn's 520-620 s
split-forward units, listed last in its setup.py, start last and the build ends on a tail.

What works: declare the slow edges first. ``order_longest_first`` rewrites ``build.ninja``
(build statements only, atomically) by the unit times of an earlier build; the ``ninja`` shim
(``write_ninja_shim``) does it right before torch's cpp_extension or CMake runs ninja, since
torch writes build.ninja and runs ninja in one step. ``seed_ninja_log`` still writes a valid
log (ninja's own command hash: MurmurHash64A for log v5/v6, rapidhash for v7 = ninja 1.13) for
a ninja that someday weighs edges by past times; today it only makes ``ninja -t`` tools aware
of the times.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ..core.errors import UsageError
from ..core.fsutil import atomic_write_text
from .jobserver import JOBSERVER_ENV, without_jobs_flag

MASK64 = (1 << 64) - 1
LOG_NAME = ".ninja_log"


# ---- ninja's command hashes ------------------------------------------------------------------
def murmur64a(data: bytes) -> int:
    """MurmurHash64A with ninja's seed 0xDECAFBADDECAFBAD (``.ninja_log`` v5 and v6)."""
    m, r = 0xC6A4A7935BD1E995, 47
    h = (0xDECAFBADDECAFBAD ^ (len(data) * m)) & MASK64
    whole = len(data) // 8 * 8
    for i in range(0, whole, 8):
        k = int.from_bytes(data[i:i + 8], "little") * m & MASK64
        k = (k ^ (k >> r)) * m & MASK64
        h = (h ^ k) * m & MASK64
    tail = data[whole:]
    if tail:
        h = (h ^ int.from_bytes(tail, "little")) * m & MASK64
    h = (h ^ (h >> r)) * m & MASK64
    return h ^ (h >> r)


_RAPID_SECRET = (0x2D358DCCAA6C78A5, 0x8BB84B93962EACC9, 0x4B33A62ED433D4A3)
_RAPID_SEED = 0xBDD89AA982704029


def _mum(a: int, b: int) -> tuple[int, int]:
    product = a * b
    return product & MASK64, product >> 64


def _mix(a: int, b: int) -> int:
    lo, hi = _mum(a, b)
    return lo ^ hi


def rapidhash(data: bytes, seed: int = _RAPID_SEED) -> int:
    """rapidhash (the version ninja 1.13 bundles, default seed): ``.ninja_log`` v7 hashes."""
    s0, s1, s2 = _RAPID_SECRET
    n = len(data)
    le = int.from_bytes
    seed ^= _mix(seed ^ s0, s1) ^ n
    if n <= 16:
        if n >= 4:
            delta = (n & 24) >> (n >> 3)
            a = le(data[:4], "little") << 32 | le(data[n - 4:n], "little")
            b = le(data[delta:delta + 4], "little") << 32 | le(data[n - 4 - delta:n - delta], "little")
        elif n:
            a, b = data[0] << 56 | data[n >> 1] << 32 | data[n - 1], 0
        else:
            a = b = 0
    else:
        p, i = 0, n
        if i > 48:
            see1 = see2 = seed
            while i >= 48:  # ninja unrolls this to 96 bytes; the result is the same
                w = [le(data[p + 8 * j:p + 8 * j + 8], "little") for j in range(6)]
                seed = _mix(w[0] ^ s0, w[1] ^ seed)
                see1 = _mix(w[2] ^ s1, w[3] ^ see1)
                see2 = _mix(w[4] ^ s2, w[5] ^ see2)
                p, i = p + 48, i - 48
            seed ^= see1 ^ see2
        if i > 16:
            seed = _mix(le(data[p:p + 8], "little") ^ s2, le(data[p + 8:p + 16], "little") ^ seed ^ s1)
            if i > 32:
                seed = _mix(le(data[p + 16:p + 24], "little") ^ s2, le(data[p + 24:p + 32], "little") ^ seed)
        a = le(data[p + i - 16:p + i - 8], "little")
        b = le(data[p + i - 8:p + i], "little")
    a, b = _mum(a ^ s1, b ^ seed)
    return _mix(a ^ s0 ^ n, b ^ s1)


def command_hash(command: str, log_version: int) -> int:
    data = command.encode("utf-8")
    return rapidhash(data) if log_version >= 7 else murmur64a(data)


# ---- a minimal build.ninja reader (what torch's cpp_extension and CMake write) ----------------
_VAR = re.compile(r"[a-zA-Z0-9_-]+")
_SHELL_SAFE = re.compile(r"[A-Za-z0-9_+\-./]+")


@dataclass
class Edge:
    outputs: list[str]
    rule: str
    inputs: list[str]  # explicit inputs: what $in names
    bindings: dict[str, str] = field(default_factory=dict)


@dataclass
class NinjaFile:
    variables: dict[str, str] = field(default_factory=dict)
    rules: dict[str, dict[str, str]] = field(default_factory=dict)  # raw, evaluated per edge
    edges: list[Edge] = field(default_factory=list)


def _logical_lines(text: str) -> list[str]:
    """Join ``$``-newline continuations (and the next line's indentation), keep other escapes."""
    out, i = [], 0
    buf: list[str] = []
    while i < len(text):
        ch = text[i]
        if ch == "$" and i + 1 < len(text):
            if text[i + 1] == "\n":
                i += 2
                while i < len(text) and text[i] == " ":
                    i += 1
                continue
            buf.append(text[i:i + 2])
            i += 2
            continue
        if ch == "\n":
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    if buf:
        out.append("".join(buf))
    return out


def _evaluate(raw: str, lookup) -> str:
    out, i = [], 0
    while i < len(raw):
        ch = raw[i]
        if ch != "$" or i + 1 >= len(raw):
            out.append(ch)
            i += 1
            continue
        nxt = raw[i + 1]
        if nxt in "$ :":
            out.append(nxt)
            i += 2
        elif nxt == "{":
            end = raw.index("}", i)
            out.append(lookup(raw[i + 2:end]))
            i = end + 1
        else:
            m = _VAR.match(raw, i + 1)
            if not m:
                raise UsageError(f"build.ninja: bad $-escape in {raw!r}")
            out.append(lookup(m.group()))
            i = m.end()
    return "".join(out)


def _split_paths(raw: str) -> list[str]:
    """Split a build line's path list on unescaped spaces (``$ `` stays inside a path)."""
    parts, buf, i = [], [], 0
    while i < len(raw):
        if raw[i] == "$" and i + 1 < len(raw):
            buf.append(raw[i:i + 2])
            i += 2
        elif raw[i] == " ":
            if buf:
                parts.append("".join(buf))
            buf, i = [], i + 1
        else:
            buf.append(raw[i])
            i += 1
    if buf:
        parts.append("".join(buf))
    return parts


def _unescaped_colon(raw: str) -> int:
    i = 0
    while i < len(raw):
        if raw[i] == "$":
            i += 2
        elif raw[i] == ":":
            return i
        else:
            i += 1
    raise UsageError(f"build.ninja: build line without ':': {raw!r}")


def _canon(path: str) -> str:
    return posixpath.normpath(path) if path else path


def _parse_build(rest: str, file_lookup) -> Edge:
    colon = _unescaped_colon(rest)
    outs_raw = _split_paths(rest[:colon])
    ins_raw = _split_paths(rest[colon + 1:])
    rule, ins_raw = ins_raw[0], ins_raw[1:]
    explicit_outs = outs_raw[:outs_raw.index("|")] if "|" in outs_raw else outs_raw
    stop = next((k for k, p in enumerate(ins_raw) if p in ("|", "||", "|@")), len(ins_raw))
    return Edge(outputs=[_canon(_evaluate(p, file_lookup)) for p in explicit_outs], rule=rule,
                inputs=[_canon(_evaluate(p, file_lookup)) for p in ins_raw[:stop]])


def parse_ninja(path: Path) -> NinjaFile:
    """Read the subset of the ninja language that torch and CMake write; follows ``include``."""
    nf = NinjaFile()
    _parse_into(nf, path, path.parent)
    return nf


def _parse_into(nf: NinjaFile, path: Path, root: Path) -> None:
    current: dict[str, str] | None = None  # bindings of the rule or edge being read
    file_lookup = lambda name: nf.variables.get(name, "")  # noqa: E731
    for line in _logical_lines(path.read_text()):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        # a value keeps its trailing spaces, as in ninja (CMake writes ``LAUNCHER = sccache `` to go
        # before the compiler's path); only leading ones go
        if line[0] in " \t" and current is not None:
            key, _, value = line.lstrip().partition("=")
            current[key.strip()] = value.lstrip()
            continue
        word, _, rest = stripped.partition(" ")
        current = None
        if word == "rule":
            current = nf.rules.setdefault(rest.strip(), {})
        elif word == "build":
            nf.edges.append(_parse_build(rest, file_lookup))
            current = nf.edges[-1].bindings
        elif word in ("include", "subninja"):
            _parse_into(nf, root / _evaluate(rest.strip(), file_lookup), root)
        elif word in ("default", "pool"):
            current = {} if word == "pool" else None
        elif "=" in stripped:
            key, _, value = line.lstrip().partition("=")
            nf.variables[key.strip()] = _evaluate(value.lstrip(), file_lookup)


def _shell_escape(path: str) -> str:
    if _SHELL_SAFE.fullmatch(path):
        return path
    return "'" + path.replace("'", "'\\''") + "'"


def edge_command(nf: NinjaFile, edge: Edge) -> str:
    """The command line ninja runs (and hashes) for ``edge``: ninja's EvaluateCommand."""
    rule = nf.rules.get(edge.rule)
    if rule is None:
        raise UsageError(f"build.ninja: unknown rule {edge.rule!r}")
    evaluated: dict[str, str] = {}
    for key, raw in edge.bindings.items():  # edge bindings: evaluated in order, in file scope
        evaluated[key] = _evaluate(raw, lambda n: evaluated.get(n, nf.variables.get(n, "")))

    def lookup(name: str) -> str:
        if name == "in":
            return " ".join(_shell_escape(p) for p in edge.inputs)
        if name == "in_newline":
            return "\n".join(_shell_escape(p) for p in edge.inputs)
        if name == "out":
            return " ".join(_shell_escape(p) for p in edge.outputs)
        if name in evaluated:
            return evaluated[name]
        if name in rule:
            return _evaluate(rule[name], lookup)
        return nf.variables.get(name, "")

    command = lookup("command")
    rsp = lookup("rspfile_content")
    return command + ";rspfile=" + rsp if rsp else command


# ---- .ninja_log ------------------------------------------------------------------------------
def ninja_version(ninja: str = "ninja") -> tuple[int, ...]:
    """``ninja --version`` as numbers: ``1.13.2.git.kitware.jobserver-pipe-1`` -> (1, 13, 2)."""
    text = subprocess.run([ninja, "--version"], capture_output=True, text=True, check=True).stdout
    return tuple(int(x) for x in re.findall(r"\d+", text.split(".git")[0])[:3])


def log_version_for(version: tuple[int, ...]) -> int:
    """The log format to seed: v7 (rapidhash) for ninja >= 1.13, else v5 (MurmurHash64A).

    ninja < 1.13 reads v5 and upgrades it; writing v5 avoids guessing 1.12's v6 details.
    """
    return 7 if version >= (1, 13) else 5


def read_ninja_log(build_dir: Path) -> dict[str, float]:
    """Seconds per output of the latest run of each edge in ``build_dir/.ninja_log`` (v5-v7).

    ``build_dir`` may also be a log file itself (the shim's saved copies).
    """
    path = Path(build_dir)
    path = path if path.is_file() else path / LOG_NAME
    if not path.is_file():
        return {}
    lines = path.read_text(errors="replace").splitlines()
    if not lines or not re.fullmatch(r"# ninja log v[5-7]", lines[0].strip()):
        raise UsageError(f"{path}: not a ninja log v5-v7 (first line {lines[:1]!r})")
    times: dict[str, float] = {}
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) == 5 and fields[0].isdigit() and fields[1].isdigit():
            times[fields[3]] = (int(fields[1]) - int(fields[0])) / 1000.0  # later runs win
    return times


def unit_key(output: str) -> str:
    """How a unit is known across builds: its file name (build folders differ, names don't)."""
    return posixpath.basename(output)


def _lookup_seconds(unit_seconds: dict[str, float], output: str) -> float | None:
    if output in unit_seconds:
        return unit_seconds[output]
    by_name = {unit_key(k): v for k, v in unit_seconds.items()}
    return by_name.get(unit_key(output))


def seed_ninja_log(build_dir: Path, unit_seconds: dict[str, float], ninja: str = "ninja") -> int:
    """Write ``build_dir/.ninja_log`` with past unit times, hashed as ``ninja`` would; return count.

    Entries carry mtime 0, so ninja still treats every output as dirty (a seed never skips work).
    """
    build_dir = Path(build_dir)
    version = log_version_for(ninja_version(ninja))
    nf = parse_ninja(build_dir / "build.ninja")
    lines = [f"# ninja log v{version}\n"]
    for edge in nf.edges:
        if edge.rule == "phony":
            continue
        for output in edge.outputs:
            seconds = _lookup_seconds(unit_seconds, output)
            if seconds is not None:
                digest = command_hash(edge_command(nf, edge), version)
                lines.append(f"0\t{round(seconds * 1000)}\t0\t{output}\t{digest:x}\n")
    atomic_write_text(build_dir / LOG_NAME, "".join(lines))
    return len(lines) - 1


# ---- longest first ---------------------------------------------------------------------------
def _blocks(text: str) -> list[str]:
    """Physical blocks: a top-level line with its indented and ``$``-continued lines."""
    blocks: list[str] = []
    continued = False
    for line in text.splitlines(keepends=True):
        if blocks and (continued or line[:1] in (" ", "\t")):
            blocks[-1] += line
        else:
            blocks.append(line)
        body = line.rstrip("\n")
        continued = body.endswith("$") and (len(body) - len(body.rstrip("$"))) % 2 == 1
    return blocks


def _movable(blocks: list[str]) -> list[int] | None:
    """Indexes of build blocks, or None when reordering could break the file."""
    builds = [i for i, b in enumerate(blocks) if b.startswith("build ")]
    if not builds:
        return None
    for block in blocks[builds[0]:]:
        word = block.split(" ", 1)[0].strip()
        if word not in ("build", "default", "#", "") and not block.startswith("#"):
            return None  # a rule, pool, include or variable after the first build
    return builds


def _estimate(nf_edge: Edge, unit_seconds: dict[str, float], fallback: float) -> float:
    known = [_lookup_seconds(unit_seconds, o) for o in nf_edge.outputs]
    known = [s for s in known if s is not None]
    return max(known) if known else fallback


def order_longest_first(build_dir: Path, unit_seconds: dict[str, float]) -> int:
    """Rewrite ``build.ninja`` so build statements come slowest first; return how many moved.

    Only build blocks move, into the slots build blocks held, and only when all rules,
    pools, includes and variables come before the first build (else nothing changes: 0).
    Units without a past time get the median (new units are neither first nor last).
    """
    path = Path(build_dir) / "build.ninja"
    text = path.read_text()
    blocks = [b if b.endswith("\n") else b + "\n" for b in _blocks(text)]
    slots = _movable(blocks)
    if not slots or not unit_seconds:
        return 0
    nf = parse_ninja(path)
    if len(nf.edges) != len(slots):
        return 0  # includes add edges we cannot place; leave the file alone
    fallback = statistics.median(unit_seconds.values())
    weights = [_estimate(e, unit_seconds, fallback) for e in nf.edges]
    order = sorted(range(len(slots)), key=lambda k: -weights[k])  # stable: ties keep file order
    new_blocks = list(blocks)
    for slot, k in zip(slots, order):
        new_blocks[slot] = blocks[slots[k]]
    moved = sum(1 for pos, k in enumerate(order) if pos != k)
    if moved:
        atomic_write_text(path, "".join(new_blocks))
    return moved


# ---- nvcc flags for some units (``nvcc -split-compile`` on the long ones) ---------------------
_NVCC_WORD = re.compile(r"(?<!\S)(?:\S*/)?nvcc(?!\S)")   # the compiler word, after any launcher
FLAGS_APPLIED = "nvcc-flags-applied.txt"    # in the shim's log folder: the units whose command got flags


def add_nvcc_flags(build_dir: Path, unit_flags: dict[str, list[str]]) -> list[str]:
    """Give the named units (``unit_key`` names) extra nvcc flags; return the units that have them.

    Each such build statement gets its own ``command`` binding: the rule's command evaluated for
    that edge with the flags right after the ``nvcc`` word (build-level bindings come before the
    rule's in ninja's scoping), so the other units and the rule stay as they were, and a launcher
    in front (sccache, the memory gate) sees the flags and keys its cache on them. A second call
    changes nothing. Units not in this file are left to another build.ninja; a named unit whose
    command has no ``nvcc`` is an error, not a silent drop.
    """
    if not unit_flags:
        return []
    path = Path(build_dir) / "build.ninja"
    nf = parse_ninja(path)
    by_output = {o: e for e in nf.edges for o in e.outputs}
    lookup = lambda name: nf.variables.get(name, "")  # noqa: E731
    blocks, changed, rewritten = _blocks(path.read_text()), [], False
    for k, block in enumerate(blocks):
        if not block.startswith("build "):
            continue
        outputs = _parse_build(_logical_lines(block)[0][len("build "):], lookup).outputs
        unit = next((unit_key(o) for o in outputs if unit_key(o) in unit_flags), None)
        if unit is None:
            continue
        command = edge_command(nf, by_output[outputs[0]]).split(";rspfile=", 1)[0]
        word = _NVCC_WORD.search(command)
        if word is None or "\n" in command:
            raise UsageError(f"build.ninja: {unit} is not an nvcc compile, so it cannot take "
                             f"{' '.join(unit_flags[unit])}: {command[:120]}")
        changed.append(unit)
        flags = " " + shlex.join(unit_flags[unit])
        if command.startswith(flags, word.end()):
            continue    # given before: CMake builds run ninja once a target on the same file
        command = command[:word.end()] + flags + command[word.end():]
        blocks[k] = block.rstrip("\n") + "\n  command = " + command.replace("$", "$$") + "\n"
        rewritten = True
    if rewritten:
        atomic_write_text(path, "".join(blocks))
    return changed


# ---- the ninja shim: reorder right before the real ninja runs ----------------------------------
SHIM_TIMES_ENV = "BLACKWHEEL_NINJA_TIMES"  # JSON {output or file name: seconds}
SHIM_LOGS_ENV = "BLACKWHEEL_NINJA_LOG_DIR"  # where each run's .ninja_log is copied afterwards
SHIM_REAL_ENV = "BLACKWHEEL_REAL_NINJA"
SHIM_ONLY_ENV = "BLACKWHEEL_NINJA_ONLY"  # comma-separated unit names: build only these (bench_build)
SHIM_FLAGS_ENV = "BLACKWHEEL_NINJA_NVCC_FLAGS"  # JSON file {unit name: [nvcc flags]} (add_nvcc_flags)


def write_ninja_shim(shim_dir: Path, real_ninja: str) -> Path:
    """Write ``shim_dir/ninja``; put ``shim_dir`` first on PATH for the build.

    The shim reads the env vars above at run time, so one shim serves every build.
    """
    shim_dir = Path(shim_dir)
    if Path(real_ninja).resolve() == (shim_dir / "ninja").resolve():
        return shim_dir / "ninja"    # already the shim: rewriting it to run itself would loop forever
    src_root = Path(__file__).resolve().parents[2]
    script = (
        "#!/bin/sh\n"
        "# blackwheel: reorder build.ninja slowest-first, run the real ninja, keep its log\n"
        f"{SHIM_REAL_ENV}={shlex.quote(str(real_ninja))} "
        f"PYTHONPATH={shlex.quote(str(src_root))}${{PYTHONPATH:+:$PYTHONPATH}} "
        f"exec {shlex.quote(sys.executable)} -m blackwheel.toolchain.ninja \"$@\"\n"
    )
    path = atomic_write_text(shim_dir / "ninja", script)
    path.chmod(0o755)
    return path


def _build_dir_of(args: list[str]) -> Path:
    build_dir = Path.cwd()
    for flag, value in zip(args, args[1:]):
        if flag == "-C":
            build_dir = build_dir / value
    return build_dir


def _load_times(path: str | None) -> dict[str, float]:
    if not path or not Path(path).is_file():
        return {}
    return {str(k): float(v) for k, v in json.loads(Path(path).read_text()).items()}


def _save_log(build_dir: Path, log_dir: str | None) -> None:
    log = build_dir / LOG_NAME
    if log_dir and log.is_file():
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        runs = len(list(Path(log_dir).glob("*.ninja_log")))
        shutil.copyfile(log, Path(log_dir) / f"{runs:03d}.ninja_log")


def _flag_units(build_dir: Path, flags_json: str | None, log_dir: str | None) -> None:
    """``add_nvcc_flags`` from the shim's JSON; the units changed are appended to the log folder's
    ``FLAGS_APPLIED``, so a caller can check that every unit it named got its flags."""
    if not flags_json:
        return
    changed = add_nvcc_flags(build_dir, json.loads(Path(flags_json).read_text()))
    if changed and log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(log_dir) / FLAGS_APPLIED, "a") as f:
            f.write("".join(f"{u}\n" for u in changed))


def subset_outputs(build_dir: Path, only: str | None) -> list[str]:
    """The outputs of the named units (file names), in build.ninja's order; [] = build everything."""
    if not only:
        return []
    wanted = {u.strip() for u in only.split(",") if u.strip()}
    nf = parse_ninja(Path(build_dir) / "build.ninja")
    outputs = [o for e in nf.edges if e.rule != "phony" for o in e.outputs if unit_key(o) in wanted]
    missing = wanted - {unit_key(o) for o in outputs}
    if missing:
        raise UsageError(f"{SHIM_ONLY_ENV}: no such compile unit(s) in build.ninja: {', '.join(sorted(missing))}")
    return outputs


def shim_main(args: list[str], environ: dict[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    real = env.get(SHIM_REAL_ENV) or "ninja"
    is_build = not any(a.startswith(("--version", "-t", "-h", "--help")) for a in args)
    build_dir = _build_dir_of(args)
    if is_build and "-f" not in args and (build_dir / "build.ninja").is_file():
        order_longest_first(build_dir, _load_times(env.get(SHIM_TIMES_ENV)))
        _flag_units(build_dir, env.get(SHIM_FLAGS_ENV), env.get(SHIM_LOGS_ENV))
        args = args + subset_outputs(build_dir, env.get(SHIM_ONLY_ENV))
    if is_build and env.get(JOBSERVER_ENV):
        args = without_jobs_flag(args)      # an explicit -j would leave the shared job budget
    rc = subprocess.call([real, *args])
    if is_build:
        _save_log(build_dir, env.get(SHIM_LOGS_ENV))
    return rc


# ---- progress and the profile ----------------------------------------------------------------
_PROGRESS = re.compile(r"^\s*\[(\d+)/(\d+)\]")


def unit_progress(line: str) -> tuple[int, int] | None:
    """``[12/73] nvcc ...`` -> (12, 73); anything else -> None."""
    m = _PROGRESS.match(line)
    return (int(m.group(1)), int(m.group(2))) if m else None


def build_profile(unit_seconds: dict[str, float], wall_s: float, cores: int,
                  peak_rss_bytes: int | None, cache_stats: dict | None, top: int = 10) -> dict:
    """What bounded a build: CPU (sum of unit times / cores) or its longest unit.

    ``efficiency`` = unit CPU time / (wall * cores): 1.0 means every core compiled all along.
    """
    if wall_s <= 0 or cores < 1:
        raise UsageError(f"profile needs wall time > 0 and cores >= 1 (got {wall_s}, {cores})")
    total = sum(unit_seconds.values())
    longest = max(unit_seconds.values(), default=0.0)
    bound = max(total / cores, longest)
    slowest = sorted(unit_seconds.items(), key=lambda kv: -kv[1])[:top]
    return {
        "units": len(unit_seconds),
        "wall_s": round(wall_s, 1),
        "cores": cores,
        "unit_seconds_sum": round(total, 1),
        "longest_unit_s": round(longest, 1),
        "lower_bound_s": round(bound, 1),
        "bound_by": "longest unit" if longest >= total / cores else "cpu",
        "efficiency": round(total / (wall_s * cores), 3),
        "slowest_units": [{"unit": unit_key(k), "seconds": round(v, 1)} for k, v in slowest],
        "peak_rss_bytes": peak_rss_bytes,
        "cache": cache_stats,
    }


def main(argv: Iterable[str] | None = None) -> int:
    return shim_main(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
