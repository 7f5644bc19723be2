"""Prove that built CUDA objects run natively on every device of a target (``verify``), and say
what runs on one device (``compat``).

A build that "succeeds" without code for the target is the failure this guards against (torch's
arch parsing turning 12.1 into sm_75 only, vLLM #49904): every object with CUDA code must hold a
cubin that runs natively (``CudaArch.cubin_runs_on``) on each device; PTX alone does not pass,
because it JIT-compiles slowly and may hold only ``__CUDA_ARCH__`` stubs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import PurePosixPath
from typing import Iterable, Mapping, Sequence, Union

from ..core.errors import UsageError, VerifyFailed
from .inspect import InspectReport, ObjectReport, inspect_path
from ..core.targets import ComputeCapability, CudaArch, Target

PathLike = Union[str, os.PathLike]
Inputs = Union[PathLike, InspectReport, Iterable[Union[PathLike, InspectReport]]]
Required = Mapping[str, Sequence[CudaArch]]


@dataclass(frozen=True)
class VerifyReport:
    target: Target
    sources: tuple[str, ...]
    objects: tuple[ObjectReport, ...]  # every ELF object read, with or without CUDA code
    failures: tuple[str, ...]
    required: tuple[tuple[str, tuple[CudaArch, ...]], ...] = ()
    jit_accepted: tuple[str, ...] = ()   # devices served by PTX JIT where the recipe declares it fine
    remarks: tuple[str, ...] = ()        # what a caller's further check adds (a trace's verdict)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def notes(self) -> tuple[str, ...]:
        """Objects that pass as a whole, yet hold compilation units with no native cubin for a device
        (e.g. vLLM's 9.0a-only CUTLASS units): fine only if those kernels are never dispatched there."""
        notes = []
        for obj in self.objects:
            for cc in self.target.devices:
                missing, total = obj.units_without_native(cc)
                if missing and best_native(obj.cubins, cc):
                    notes.append(f"{obj.path}: {missing} of {total} compilation units have no cubin for {cc}")
        return tuple(notes) + self.jit_accepted + self.remarks

    def raise_for_failure(self) -> None:
        if self.failures:
            more = f" (and {len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
            raise VerifyFailed(f"verify for target {self.target.name} failed: {self.failures[0]}{more}")

    def to_dict(self) -> dict:
        return {
            "target": self.target.name,
            "devices": [str(cc) for cc in self.target.devices],
            "ok": self.ok,
            "sources": list(self.sources),
            "failures": list(self.failures),
            "notes": list(self.notes),
            "required": {glob: [str(a) for a in archs] for glob, archs in self.required},
            "objects": [dict(o.to_dict(), native=self._native(o)) for o in self.objects if o.has_cuda],
        }

    def _native(self, obj: ObjectReport) -> dict[str, str | None]:
        """Per device, the cubin that runs natively on it (None: nothing does)."""
        return {str(cc): _str_or_none(best_native(obj.cubins, cc)) for cc in self.target.devices}

    def render_text(self) -> str:
        devices = ", ".join(str(cc) for cc in self.target.devices)
        cuda = [o for o in self.objects if o.has_cuda]
        head = "OK" if self.ok else f"FAILED ({len(self.failures)})"
        lines = [f"verify {' '.join(self.sources)} for target {self.target.name} ({devices}): "
                 f"{head}, {len(cuda)} CUDA object(s)"]
        for obj in cuda:
            native = ", ".join(f"{cc}: {arch or 'none'}" for cc, arch in self._native(obj).items())
            lines.append(f"  {obj.path}  [{native}]")
        lines.extend(f"note: {note}" for note in self.notes)
        lines.extend(f"FAIL {failure}" for failure in self.failures)
        return "\n".join(lines)


def with_findings(report: VerifyReport, failures: Iterable[str], remarks: Iterable[str] = ()) -> VerifyReport:
    """``report`` with a further check's failures and remarks added (e.g. ``verify --trace``)."""
    return replace(report, failures=report.failures + tuple(failures), remarks=report.remarks + tuple(remarks))


def best_native(cubins: Iterable[CudaArch], cc: ComputeCapability) -> CudaArch | None:
    """The cubin the driver would load on ``cc``: the newest that runs, an exact 'a' match first."""
    native = [a for a in cubins if a.cubin_runs_on(cc)[0]]
    return max(native, key=lambda a: (a.minor, a.suffix == "a", a.suffix == ""), default=None)


def _str_or_none(arch: CudaArch | None) -> str | None:
    return None if arch is None else str(arch)


def _reports(inputs: Inputs) -> list[InspectReport]:
    if isinstance(inputs, (InspectReport, str, os.PathLike)):
        inputs = [inputs]
    return [i if isinstance(i, InspectReport) else inspect_path(i) for i in inputs]


def _device_failures(obj: ObjectReport, target: Target, served_by_jit: Iterable[ComputeCapability] = ()) -> list[str]:
    failures = []
    for cc in target.uncovered(obj.cubins):
        if cc in served_by_jit:
            continue
        have = " ".join(str(a) for a in obj.cubins) or "none"
        jit = [a for a in obj.ptx if a.ptx_jits_on(cc)[0]]
        hint = f"; PTX {jit[-1]} would only JIT-compile" if jit else ""
        failures.append(f"{obj.path}: no cubin runs natively on {cc} (target {target.name}); "
                        f"cubins: {have}{hint}")
    return failures


def _link_failures(obj: ObjectReport) -> list[str]:
    """A library that calls the driver without naming libcuda.so.1 fails to load (``undefined
    symbol``) unless the process loaded libcuda globally first: a build host's empty libcuda stub
    dropped by ``--as-needed`` makes such libraries."""
    if not obj.driver_unlinked:
        return []
    some = ", ".join(obj.driver_calls[:3]) + (", ..." if len(obj.driver_calls) > 3 else "")
    return [f"{obj.path}: calls {len(obj.driver_calls)} CUDA driver function(s) ({some}) but does not "
            f"link libcuda.so.1 (not in its NEEDED): it fails to load with 'undefined symbol'"]


_TORCH_LIBRARY = re.compile(r"lib(c10|torch)(_[a-z]+)*\.so(\.[0-9.]+)?")


def torch_link_failures(objects: Iterable[ObjectReport], declared: bool, package: str) -> list[str]:
    """The recipe's ``links-torch`` must say what the libraries do: a wheel whose libraries link
    libtorch/libc10 loads only beside the torch it was built against, so its name and metadata must
    say which (and a wheel that does not must not claim one)."""
    linking = [o.path for o in objects if any(_TORCH_LIBRARY.fullmatch(n) for n in o.needed)]
    if linking and not declared:
        return [f"{linking[0]} links torch ({len(linking)} of the wheel's libraries do), "
                f"but recipe {package} lacks links-torch = true: its wheel name would not say which torch it needs"]
    if declared and not linking:
        return [f"recipe {package} says links-torch = true, but no library in the wheel links libtorch or "
                "libc10: its name and metadata would claim a torch it does not need"]
    return []


def _matches(obj: ObjectReport, glob: str) -> bool:
    return fnmatch(obj.path, glob) or fnmatch(PurePosixPath(obj.path).name, glob)


def _required_failures(objects: Sequence[ObjectReport], required: Required) -> list[str]:
    """Each glob must match a CUDA object; each match must carry every listed cubin exactly."""
    failures = []
    for glob, archs in required.items():
        matched = [o for o in objects if o.has_cuda and _matches(o, glob)]
        if not matched:
            failures.append(f"required {glob}: no CUDA object matches")
        for obj in matched:
            failures.extend(f"{obj.path}: lacks required cubin {arch.sm} (required for {glob})"
                            for arch in archs if arch not in obj.cubins)
    return failures


def _jit_accepted(obj: ObjectReport, target: Target) -> dict[ComputeCapability, str]:
    """For an object the recipe declares PTX-only-ok: each device its PTX serves by JIT, with a note."""
    out = {}
    for cc in target.uncovered(obj.cubins):
        jit = [a for a in obj.ptx if a.ptx_jits_on(cc)[0]]
        if jit:
            out[cc] = (f"{obj.path}: runs on {cc} by PTX JIT from {jit[-1]} (slow first launch; "
                       f"the recipe declares this library PTX-only-ok)")
    return out


def verify_paths(inputs: Inputs, target: Target, required: Required | None = None,
                 ptx_ok: Sequence[str] = ()) -> VerifyReport:
    """Check every CUDA object in ``inputs`` (paths or InspectReports) against ``target``.

    ``required`` maps a glob (matched against the object's path or file name) to cubins that
    matching objects must carry exactly, e.g. ``{"*_C*.so": [CudaArch.parse("12.1a")]}``; an empty
    list only demands that a CUDA object matching the glob exists. Objects matching a ``ptx_ok``
    glob (the recipe's ``expect.ptx-only-ok``) may serve a device by PTX JIT instead of a cubin.
    """
    required = {glob: tuple(archs) for glob, archs in (required or {}).items()}
    reports = _reports(inputs)
    objects = tuple(o for r in reports for o in r.objects)
    sources = tuple(r.source for r in reports)
    failures = [f"{o.path}: could not read: {o.error}" for o in objects if o.error]
    failures += [line for o in objects for line in _link_failures(o)]
    cuda = [o for o in objects if o.has_cuda]
    if not cuda:
        failures.append(f"{', '.join(sources)}: no CUDA code at all (no cubin or PTX in any ELF file); "
                        "the build produced no kernels")
    accepted: list[str] = []
    for obj in cuda:
        jit = _jit_accepted(obj, target) if any(_matches(obj, g) for g in ptx_ok) else {}
        failures.extend(_device_failures(obj, target, jit))
        accepted.extend(jit.values())
    failures.extend(_required_failures(cuda, required))
    return VerifyReport(target, sources, objects, tuple(failures), tuple(required.items()), tuple(accepted))


def verify_wheel(wheel_path: PathLike, target: Target, required: Required | None = None,
                 ptx_ok: Sequence[str] = ()) -> VerifyReport:
    if not str(wheel_path).endswith(".whl"):
        raise UsageError(f"{wheel_path}: not a wheel (expected a .whl file)")
    if not os.path.isfile(wheel_path):
        raise UsageError(f"{wheel_path}: no such wheel")
    return verify_paths(wheel_path, target, required, ptx_ok)


# ---- compat: what runs on one device ----------------------------------------------------------------
@dataclass(frozen=True)
class CompatEntry:
    path: str
    cc: ComputeCapability
    verdict: str  # "native", "ptx-jit" or "none"
    arch: CudaArch | None  # the cubin (native) or PTX (ptx-jit) that serves the device
    rule: str
    units_without_native: tuple[int, int] = (0, 0)  # (units lacking a native cubin, all units)

    def to_dict(self) -> dict:
        missing, total = self.units_without_native
        return {"path": self.path, "cc": str(self.cc), "verdict": self.verdict, "arch": _str_or_none(self.arch),
                "rule": self.rule, "units_without_native": missing, "units": total}

    def render_text(self) -> str:
        what = {"native": f"cubin {self.arch}", "ptx-jit": f"PTX {self.arch}, slow first launch",
                "none": "no kernel image for this device"}[self.verdict]
        missing, total = self.units_without_native
        part = f"; {missing} of {total} compilation units have no cubin for it" if missing else ""
        return f"{self.verdict:8} {self.path}: {what} ({self.rule}){part}"


def _why_none(obj: ObjectReport, cc: ComputeCapability) -> str:
    if obj.error:
        return f"could not read: {obj.error}"
    same_major = [a for a in obj.cubins if a.major == cc.major] or list(obj.cubins[-1:])
    reasons = [a.cubin_runs_on(cc)[1] for a in same_major]
    reasons += [a.ptx_jits_on(cc)[1] for a in obj.ptx[-1:]]
    return "; ".join(reasons) or "no cubin or PTX"


def compat_object(obj: ObjectReport, cc: ComputeCapability) -> CompatEntry:
    """The verdict for one object: native cubin, else JIT-able PTX, else none."""
    best = best_native(obj.cubins, cc)
    if best is not None:
        return CompatEntry(obj.path, cc, "native", best, best.cubin_runs_on(cc)[1], obj.units_without_native(cc))
    jit = [a for a in obj.ptx if a.ptx_jits_on(cc)[0]]
    if jit:
        best = max(jit, key=lambda a: (a.major, a.minor))
        return CompatEntry(obj.path, cc, "ptx-jit", best, best.ptx_jits_on(cc)[1])
    return CompatEntry(obj.path, cc, "none", None, _why_none(obj, cc))


def compat_objects(objects: Iterable[ObjectReport], cc: ComputeCapability) -> list[CompatEntry]:
    return [compat_object(o, cc) for o in objects if o.has_cuda or o.error]


def compat_path(path: PathLike, cc: ComputeCapability) -> list[CompatEntry]:
    return compat_objects(inspect_path(path).objects, cc)
