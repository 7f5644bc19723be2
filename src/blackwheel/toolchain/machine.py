"""The machine probe: GPU and driver, CUDA (nvcc), the host compiler and torch, each read here once.

Two readers share it: ``toolchain.probe`` (what a build refuses before it fetches anything) and
``reports.doctor`` (what this machine will get wrong, with fixes). The parsers are pure, so doctor
is tested on recorded machines; the probes run commands and never raise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from packaging.version import Version

from ..core.targets import ComputeCapability

CUDA_MAJOR = 13          # blackwheel builds with CUDA 13, and its wheels need a CUDA 13 torch
TIMEOUT_S = 60
_EXEC_LINE = re.compile(r"""^\s*exec\s+["']?(?P<path>[^\s"']*nvcc)\b""", re.MULTILINE)
_SCRIPT_LIMIT = 64 * 1024   # a wrapper script is small; a binary nvcc is never read whole


# ---- running commands -------------------------------------------------------------------------------
def run(cmd: list[str]) -> tuple[str | None, str | None]:
    """(stdout, None) or (None, why it failed): a probe never raises."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{cmd[0]}: {exc}"
    if done.returncode != 0:
        return None, f"{cmd[0]} exited {done.returncode}: {(done.stderr or done.stdout).strip()[:200]}"
    return done.stdout, None


def output(cmd: list[str]) -> str:
    """stdout whatever the exit status ("" when the command cannot run): version banners."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def first_line(cmd: list[str]) -> str | None:
    out, _ = run(cmd)
    return out.splitlines()[0].strip() if out and out.strip() else None


# ---- CUDA -------------------------------------------------------------------------------------------
def resolve_nvcc(path: Path, depth: int = 0) -> Path:
    """The real nvcc behind ``path``: follows symlinks and ``exec /x/bin/nvcc "$@"`` wrappers.

    A relative ``exec`` is not followed (it depends on the caller's folder)."""
    real = Path(path).resolve()
    if depth < 4 and real.is_file() and real.stat().st_size < _SCRIPT_LIMIT:
        head = real.read_bytes()[:_SCRIPT_LIMIT]
        if head.startswith(b"#!"):
            m = _EXEC_LINE.search(head.decode("utf-8", "replace"))
            if m and Path(m.group("path")).is_absolute():
                return resolve_nvcc(Path(m.group("path")), depth + 1)
    return real


def is_unfollowed_wrapper(path: Path) -> bool:
    """A script that still execs some other nvcc (``exec ccache /x/nvcc``, ``exec "$CUDA/bin/nvcc"``)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SCRIPT_LIMIT)
    except OSError:
        return False
    return head.startswith(b"#!") and re.search(rb"(?m)^\s*exec\b.*nvcc", head) is not None


def cuda_home_of(nvcc: str | os.PathLike | None) -> str | None:
    """The toolkit folder of an nvcc (``<home>/bin/nvcc``), as torch's cpp_extension guesses it."""
    return str(Path(nvcc).parent.parent) if nvcc else None


def parse_nvcc_version(text: str | None) -> tuple[int, ...] | None:
    """``(13, 0, 88)`` from ``nvcc --version`` (``(12, 8)`` when only the release is printed).

    >>> parse_nvcc_version("Cuda compilation tools, release 13.0, V13.0.88"), parse_nvcc_version("")
    ((13, 0, 88), None)
    """
    m = re.search(r"V(\d+)\.(\d+)\.(\d+)", text or "") or re.search(r"release (\d+)\.(\d+)", text or "")
    return tuple(int(x) for x in m.groups()) if m else None


# ---- the host compiler --------------------------------------------------------------------------------
def parse_compiler_version(text: str | None) -> tuple[str, tuple[int, ...]] | None:
    """('gcc', (12, 2, 0)) from 'g++ (Debian 12.2.0-14) 12.2.0'; clang likewise."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?\s*$", text or "") or re.search(r"(\d+)\.(\d+)\.(\d+)", text or "")
    if not m:
        return None
    kind = "clang" if "clang" in (text or "") else "gcc"
    return kind, tuple(int(x) for x in m.groups() if x is not None)


def compiler_banner(cxx: str) -> str:
    """The first line of ``cxx --version`` ("" when it cannot run)."""
    out = output([cxx, "--version"])
    return out.splitlines()[0] if out else ""


def gcc_version(cxx: str = "c++") -> Version | None:
    """The host C++ compiler's version when it is GCC, else None (clang, or no compiler)."""
    parsed = parse_compiler_version(compiler_banner(cxx))
    return Version(".".join(map(str, parsed[1]))) if parsed and parsed[0] == "gcc" else None


# ---- torch ----------------------------------------------------------------------------------------------
# Run in a child interpreter (the build Python, or doctor's): a torch import that crashes must not
# take the caller down, and the build Python may not be this one.
TORCH_SCRIPT = """
import json, sys, sysconfig, torch
d = {
  "torch": torch.__version__, "torch_cuda": torch.version.cuda,
  "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
  "arch_list": list(torch._C._cuda_getArchFlags().split()) if torch.version.cuda else [],
  "python": sys.version.split()[0], "platform": sysconfig.get_platform(),
  "purelib": sysconfig.get_paths()["purelib"], "available": torch.cuda.is_available(),
}
if d["available"]:
    d["device_cc"] = "%d.%d" % torch.cuda.get_device_capability(0)
print(json.dumps(d))
"""


def torch_facts(python: str) -> dict:
    """What ``TORCH_SCRIPT`` prints in ``python``, or ``{"error": why}``; never raises."""
    out, err = run([python, "-c", TORCH_SCRIPT])
    if out is None:
        return {"error": err}
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": f"unexpected output: {out[:200]}"}


# ---- the GPU ---------------------------------------------------------------------------------------------
def nvidia_smi() -> tuple[str | None, str | None]:
    """``name, compute_cap, driver_version`` per GPU (csv), or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return None, "nvidia-smi not found"
    return run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"])


def detect_compute_capability() -> ComputeCapability | None:
    """The first GPU's capability: nvidia-smi, else torch; None without a GPU. Never raises."""
    try:
        smi, _ = run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]) \
            if shutil.which("nvidia-smi") else (None, None)
        for line in (smi or "").splitlines():
            if re.fullmatch(r"\s*\d+\.\d\s*", line):
                return ComputeCapability.parse(line)
        driver_nodes = ("/dev/nvidiactl", "/dev/dxg")  # no driver node: torch cannot see a GPU either
        if any(os.path.exists(n) for n in driver_nodes) and importlib.util.find_spec("torch") is not None:
            import torch  # optional and heavy: only on a machine with a driver and no nvidia-smi

            if torch.cuda.is_available():
                return ComputeCapability(*torch.cuda.get_device_capability(0))
    except Exception:  # a probe: any failure means "unknown", never a crash
        return None
    return None
