"""The one arch vocabulary: CUDA architectures, the rules for what runs where, and build targets.

Every other module speaks ``CudaArch`` and ``Target``; package spellings (``12.1a``, ``121a``,
``-gencode arch=compute_121a,code=sm_121a``) are produced here and nowhere else.

Rules (see shared notes, "Binary compatibility"):
- a plain cubin ``sm_XY`` runs on devices of the same major with minor >= Y;
- an arch-specific cubin ``sm_XYa`` runs only on exactly X.Y (FlashInfer PR #2839);
- a family cubin ``sm_XYf`` runs like a plain one (cuobjdump lists it as ``sm_XY``);
- SASS never crosses a major version;
- PTX ``compute_XY`` is JIT-compiled on any device >= X.Y; ``compute_XYa`` only on X.Y;
  ``compute_XYf`` on the family (same major, minor >= Y).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import UsageError

SUFFIXES = ("", "a", "f")

_ARCH_RE = re.compile(
    r"^(?:(?P<kind>sm|compute|lto)_)?(?P<num>\d+)(?:\.(?P<minor>\d))?(?P<suffix>[af]?)$"
)


@dataclass(frozen=True, order=True)
class ComputeCapability:
    """What a device reports: ``torch.cuda.get_device_capability()``, ``nvidia-smi compute_cap``."""

    major: int
    minor: int

    @classmethod
    def parse(cls, text: str) -> "ComputeCapability":
        """Parse ``MAJOR.MINOR``.

        >>> ComputeCapability.parse("12.1")
        ComputeCapability(major=12, minor=1)
        """
        m = re.fullmatch(r"\s*(\d{1,2})\.(\d)\s*", str(text))
        if not m:
            raise UsageError(f"unknown compute capability {text!r}: write it as MAJOR.MINOR, e.g. 12.1")
        cc = cls(int(m.group(1)), int(m.group(2)))
        if cc.major < 5 or cc.major > 13:
            raise UsageError(f"unknown compute capability {text!r}: expected 5.0 .. 13.x")
        return cc

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}"


@dataclass(frozen=True, order=True)
class CudaArch:
    """One CUDA architecture with its suffix: ``12.1a`` is ``CudaArch(12, 1, "a")``."""

    major: int
    minor: int
    suffix: str = ""

    def __post_init__(self) -> None:
        if self.suffix not in SUFFIXES:
            raise UsageError(f"unknown arch suffix {self.suffix!r} (expected '', 'a' or 'f')")

    @classmethod
    def parse(cls, text: str) -> "CudaArch":
        """Accept every spelling packages use.

        >>> [str(CudaArch.parse(s)) for s in ("12.1a", "121a", "sm_120", "compute_120f", "9.0")]
        ['12.1a', '12.1a', '12.0', '12.0f', '9.0']
        """
        m = _ARCH_RE.match(str(text).strip())
        if not m:
            raise UsageError(f"unknown CUDA arch {text!r}: write it like 12.1a, 121a or sm_121a")
        num, minor = m.group("num"), m.group("minor")
        if minor is not None:
            major, mnr = int(num), int(minor)
        elif len(num) >= 2:
            major, mnr = int(num[:-1]), int(num[-1])
        else:
            raise UsageError(f"unknown CUDA arch {text!r}: write it like 12.1a, 121a or sm_121a")
        if not 5 <= major <= 13:  # "12" would otherwise read as 1.2 and "1200" as 120.0
            raise UsageError(f"unknown CUDA arch {text!r}: expected 5.0 .. 13.x, written like 12.1a or 121a")
        return cls(major, mnr, m.group("suffix"))

    @property
    def cc(self) -> ComputeCapability:
        return ComputeCapability(self.major, self.minor)

    @property
    def compact(self) -> str:
        return f"{self.major}{self.minor}{self.suffix}"

    @property
    def dotted(self) -> str:
        return f"{self.major}.{self.minor}{self.suffix}"

    @property
    def sm(self) -> str:
        return f"sm_{self.compact}"

    @property
    def compute(self) -> str:
        return f"compute_{self.compact}"

    def gencode(self, ptx: bool = False) -> list[str]:
        """nvcc flags for a cubin of this arch (and its PTX when ``ptx``)."""
        code = f"{self.sm},{self.compute}" if ptx else self.sm
        return ["-gencode", f"arch={self.compute},code={code}"]

    def __str__(self) -> str:
        return self.dotted

    # ---- the rules -------------------------------------------------------------------------
    def cubin_runs_on(self, cc: ComputeCapability) -> tuple[bool, str]:
        """Does SASS built for this arch run natively on a device of capability ``cc``?"""
        if self.major != cc.major:
            return False, f"SASS never crosses a major version: {self.sm} does not run on {cc}"
        if self.suffix == "a":
            if self.minor == cc.minor:
                return True, f"{self.sm} is specific to {self.cc}, which this device is"
            return False, f"{self.sm} is specific to {self.cc}; it does not run on {cc}"
        if cc.minor >= self.minor:
            kind = "family" if self.suffix == "f" else "plain"
            return True, f"{kind} {self.sm} runs on {self.major}.x devices with minor >= {self.minor}"
        return False, f"{self.sm} needs minor >= {self.minor}; {cc} is older"

    def ptx_jits_on(self, cc: ComputeCapability) -> tuple[bool, str]:
        """Can the driver JIT-compile PTX of this arch for a device of capability ``cc``?"""
        if self.suffix == "a":
            ok = (self.major, self.minor) == (cc.major, cc.minor)
            return ok, f"{self.compute} PTX is specific to {self.cc}" + ("" if ok else f", not {cc}")
        if self.suffix == "f":
            ok = self.major == cc.major and cc.minor >= self.minor
            return ok, f"{self.compute} PTX serves the {self.major}.x family from {self.cc}"
        ok = (cc.major, cc.minor) >= (self.major, self.minor)
        return ok, f"{self.compute} PTX JIT-compiles on devices >= {self.cc}" + ("" if ok else f"; {cc} is older")


def parse_arch_list(text: str | Iterable[str]) -> tuple[CudaArch, ...]:
    """Parse ``"12.0f;12.1a"``, ``"120f 121a"`` or a list; order kept, duplicates dropped."""
    items = re.split(r"[;,\s]+", text.strip()) if isinstance(text, str) else list(text)
    out: list[CudaArch] = []
    for item in items:
        if item:
            arch = CudaArch.parse(item)
            if arch not in out:
                out.append(arch)
    return tuple(out)


def spell(archs: Iterable[CudaArch], style: str, sep: str = ";") -> str:
    """A package's spelling of an arch list.

    >>> a = parse_arch_list("12.0f;12.1a")
    >>> spell(a, "dotted", " "), spell(a, "compact"), spell(a, "cmake")
    ('12.0f 12.1a', '120f;121a', '120f-real;121a-real')
    """
    archs = list(archs)
    if style == "dotted":
        return sep.join(a.dotted for a in archs)
    if style == "compact":
        return sep.join(a.compact for a in archs)
    if style == "cmake":  # CMAKE_CUDA_ARCHITECTURES: SASS only
        return sep.join(f"{a.compact}-real" for a in archs)
    if style == "gencode":
        return " ".join(" ".join(a.gencode()) for a in archs)
    raise UsageError(f"unknown arch spelling {style!r} (dotted, compact, cmake, gencode)")


def covers(archs: Iterable[CudaArch], cc: ComputeCapability) -> CudaArch | None:
    """The first cubin arch of ``archs`` that runs natively on ``cc``, or None."""
    for arch in archs:
        if arch.cubin_runs_on(cc)[0]:
            return arch
    return None


@dataclass(frozen=True)
class Target:
    """A build target: the devices whose every one must get native code."""

    name: str
    devices: tuple[ComputeCapability, ...]
    description: str

    @property
    def tag(self) -> str:
        """The wheel local-version part: ``sm121``, ``sm120.sm121``."""
        return ".".join(f"sm{cc.major}{cc.minor}" for cc in self.devices)

    def uncovered(self, archs: Iterable[CudaArch]) -> list[ComputeCapability]:
        archs = list(archs)
        return [cc for cc in self.devices if covers(archs, cc) is None]


def _cc(text: str) -> ComputeCapability:
    return ComputeCapability.parse(text)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("gb10", (_cc("12.1"),), "NVIDIA GB10 / DGX Spark (12.1, aarch64 host)"),
        Target("sm120", (_cc("12.0"),), "RTX 50 series, RTX PRO 6000 Blackwell (12.0)"),
        Target("blackwell", (_cc("12.0"), _cc("12.1")), "every SM_12x device: 12.0 and 12.1 (default)"),
        Target("hopper", (_cc("9.0"),), "H100 / H200 (9.0): the GPU test machine"),
    )
}
DEFAULT_TARGET = "blackwell"
TARGET_NAMES = tuple(TARGETS) + ("native",)


def native_target(cc: ComputeCapability) -> Target:
    """The target for the visible GPU: the named target of that device, else a plain one."""
    for t in TARGETS.values():
        if t.devices == (cc,):
            return t
    return Target(f"sm{cc.major}{cc.minor}", (cc,), f"the visible GPU ({cc})")


def resolve_target(name: str, detect: Callable[[], ComputeCapability | None] | None = None) -> Target:
    """Target by name; ``native`` asks ``detect()`` (the machine probe, passed in by the caller:
    core knows no machine) for the visible GPU's capability."""
    if name in TARGETS:
        return TARGETS[name]
    if name == "native":
        cc = detect() if detect is not None else None
        if cc is None:
            raise UsageError("target 'native' needs a visible GPU; none found (name a target instead)")
        return native_target(cc)
    raise UsageError(f"unknown target {name!r}; choose one of: {', '.join(TARGET_NAMES)}")
