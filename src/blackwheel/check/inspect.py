"""Read which CUDA code an ELF file carries: cubins (native SASS) and PTX, per architecture.

Our own reader, so a build can be checked without a CUDA toolkit. Where the code lives:
- host ELF files (``.so``, ``.o``) hold fatbin containers in ``.nv_fatbin`` (``__nv_relfatbin`` for
  ``-rdc`` objects); each container (magic 0xBA55ED50) lists entries: PTX, ELF cubin or LTO-IR;
- raw cubins (``.cubin``, ELF machine EM_CUDA) are one cubin each.

How the arch is told apart (measured with nvcc 13.0 and cuobjdump 13.5):
- the entry header carries the arch number (120) and flags; flag 0x100000 marks arch-specific
  (``sm_120a``), 0x200000 family (``sm_120f``). cuobjdump prints family cubins as ``sm_120``; we
  report ``12.0f`` because the flag tells them apart;
- the cubin's own ELF ``e_flags`` carry only the number (identical for 120, 120a, 120f), so a raw
  cubin's suffix comes from the ptxas command line in its ``.note.nv.tkinfo`` note;
- entries may be compressed (flag 0x2000: LZ4, nvcc ``-compress-mode=speed``; 0x8000: ZSTD, the
  CUDA 13 default for PTX). The header is never compressed, so compressed entries report their arch
  without decompressing. Uncompressed PTX is read for its ``.target`` line, which wins if present.
"""

from __future__ import annotations

import importlib.metadata
import io
import os
import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from ..core.errors import UsageError
from ..core.targets import CudaArch

ELF_MAGIC = b"\x7fELF"
FATBIN_MAGIC = 0xBA55ED50
EM_CUDA = 190
FATBIN_SECTIONS = (".nv_fatbin", "__nv_relfatbin")

_CONTAINER = struct.Struct("<IHHQ")  # magic, version, header size, size of the entries
_ENTRY = struct.Struct("<HHIQ")  # kind, version, header size, payload size
ENTRY_MIN_HEADER = 64
KIND_PTX, KIND_ELF, KIND_LTO = 1, 2, 8
FLAG_LZ4, FLAG_ZSTD = 0x2000, 0x8000
FLAG_ARCH_SPECIFIC, FLAG_FAMILY = 0x100000, 0x200000

FAMILY_NOTE = ("family cubins (e.g. 12.0f) are told apart by their fatbin entry flag; "
               "cuobjdump lists them without the f (sm_120)")


class CorruptObject(ValueError):
    """An ELF file or fatbin that cannot be read; the message says where."""


@dataclass(frozen=True)
class FatbinEntry:
    kind: str  # "cubin", "ptx", "lto", "other"
    arch: CudaArch
    compression: str | None  # "lz4", "zstd" or None


Units = tuple[tuple[tuple[CudaArch, ...], int], ...]  # (cubin archs of a container, how many containers)


@dataclass(frozen=True)
class ObjectReport:
    """The CUDA code of one ELF file. ``error`` set: the file could not be read.

    ``cubins``/``ptx`` are the union over the file. ``units`` keeps each fatbin container (one per
    compilation unit) apart: a file may hold units built only for 9.0a next to units for 12.0.
    """

    path: str
    cubins: tuple[CudaArch, ...] = ()
    ptx: tuple[CudaArch, ...] = ()
    error: str | None = None
    lto: tuple[CudaArch, ...] = ()
    compression: tuple[str, ...] = ()
    units: Units = ()
    needed: tuple[str, ...] = ()          # DT_NEEDED: the libraries the loader brings in with it
    driver_calls: tuple[str, ...] = ()    # CUDA driver functions (cuXxx) it leaves for libcuda

    @property
    def driver_unlinked(self) -> bool:
        """It calls the CUDA driver but does not name libcuda: it loads only where something else
        has put libcuda in the global scope already."""
        return bool(self.driver_calls) and not any(n.startswith("libcuda.so") for n in self.needed)

    @property
    def has_cuda(self) -> bool:
        return bool(self.cubins or self.ptx or self.lto)

    def units_without_native(self, cc) -> tuple[int, int]:
        """(units with no cubin that runs natively on ``cc``, all units)."""
        missing = sum(n for archs, n in self.units if not any(a.cubin_runs_on(cc)[0] for a in archs))
        return missing, sum(n for _, n in self.units)

    def to_dict(self) -> dict:
        return {
            "path": self.path,
            "cubins": [str(a) for a in self.cubins],
            "ptx": [str(a) for a in self.ptx],
            "lto": [str(a) for a in self.lto],
            "compression": list(self.compression),
            "units": [{"cubins": [str(a) for a in archs], "count": n} for archs, n in self.units],
            "needed": list(self.needed),
            "driver_calls": list(self.driver_calls),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectReport":
        def archs(key: str) -> tuple[CudaArch, ...]:
            return tuple(CudaArch.parse(a) for a in d.get(key, ()))

        units = tuple((tuple(CudaArch.parse(a) for a in u["cubins"]), u["count"]) for u in d.get("units", ()))
        return cls(d["path"], archs("cubins"), archs("ptx"), d.get("error"), archs("lto"),
                   tuple(d.get("compression", ())), units, tuple(d.get("needed", ())),
                   tuple(d.get("driver_calls", ())))


@dataclass(frozen=True)
class InspectReport:
    """Every ELF object found under one input (wheel, file, folder or installed package)."""

    source: str
    objects: tuple[ObjectReport, ...] = field(default_factory=tuple)

    @property
    def cuda_objects(self) -> tuple[ObjectReport, ...]:
        return tuple(o for o in self.objects if o.has_cuda)

    @property
    def errors(self) -> tuple[ObjectReport, ...]:
        return tuple(o for o in self.objects if o.error)

    def to_dict(self) -> dict:
        return {"source": self.source, "objects": [o.to_dict() for o in self.objects],
                "note": FAMILY_NOTE}

    def render_text(self) -> str:
        lines = [f"{self.source}: {len(self.objects)} ELF object(s), "
                 f"{len(self.cuda_objects)} with CUDA code"]
        for obj in self.objects:
            if obj.error:
                lines.append(f"  {obj.path}: ERROR {obj.error}")
            elif obj.has_cuda:
                lines.append(f"  {obj.path}")
                lines.append(f"    cubin: {_spell(obj.cubins)}")
                lines.append(f"    ptx:   {_spell(obj.ptx)}")
                if obj.lto:
                    lines.append(f"    lto:   {_spell(obj.lto)}")
                if obj.compression:
                    lines.append(f"    compressed: {', '.join(obj.compression)}")
                if len(obj.units) > 1:  # compilation units differ in their archs
                    lines.extend(f"    {n} unit(s): {_spell(archs)}" for archs, n in obj.units)
        if any(a.suffix == "f" for o in self.objects for a in o.cubins):
            lines.append(f"note: {FAMILY_NOTE}")
        return "\n".join(lines)


def _spell(archs: Iterable[CudaArch]) -> str:
    return " ".join(str(a) for a in archs) or "-"


# ---- fatbin containers ----------------------------------------------------------------------------
def _arch_from_number(number: int, flags: int) -> CudaArch:
    suffix = "a" if flags & FLAG_ARCH_SPECIFIC else "f" if flags & FLAG_FAMILY else ""
    if number < 10:
        raise CorruptObject(f"fatbin entry names impossible arch number {number}")
    return CudaArch(number // 10, number % 10, suffix)


def _ptx_target(payload: bytes) -> CudaArch | None:
    m = re.search(rb"^\s*\.target\s+(sm_\d+[af]?)", payload[:4096], re.MULTILINE)
    return CudaArch.parse(m.group(1).decode()) if m else None


def _parse_entry(data: bytes, pos: int, end: int) -> tuple[FatbinEntry, int]:
    if pos + ENTRY_MIN_HEADER > end:
        raise CorruptObject(f"truncated fatbin: entry header at byte {pos} runs past the container")
    kind, _version, header_size, size = _ENTRY.unpack_from(data, pos)
    (number,) = struct.unpack_from("<I", data, pos + 28)
    (flags,) = struct.unpack_from("<Q", data, pos + 40)
    payload_at = pos + header_size
    if header_size < ENTRY_MIN_HEADER or payload_at + size > end:
        raise CorruptObject(f"truncated fatbin: entry at byte {pos} claims {size} bytes past the container end")
    compression = "zstd" if flags & FLAG_ZSTD else "lz4" if flags & FLAG_LZ4 else None
    arch = _arch_from_number(number, flags)
    name = {KIND_PTX: "ptx", KIND_ELF: "cubin", KIND_LTO: "lto"}.get(kind, "other")
    if name == "ptx" and compression is None:
        arch = _ptx_target(data[payload_at:payload_at + size]) or arch
    return FatbinEntry(name, arch, compression), payload_at + size


def parse_fatbin(data: bytes) -> list[FatbinEntry]:
    """Every entry of the fatbin containers in ``data`` (a fatbin section's bytes)."""
    return [entry for unit in parse_fatbin_units(data) for entry in unit]


def parse_fatbin_units(data: bytes) -> list[list[FatbinEntry]]:
    """The entries of each fatbin container in ``data``, container by container."""
    units: list[list[FatbinEntry]] = []
    pos = 0
    while pos + _CONTAINER.size <= len(data):
        magic, _version, header_size, size = _CONTAINER.unpack_from(data, pos)
        if magic != FATBIN_MAGIC:
            if any(data[pos:pos + 8]):
                raise CorruptObject(f"not a fatbin container at byte {pos} (bad magic {magic:#x})")
            pos += 8  # zero padding between containers
            continue
        end = pos + header_size + size
        if end > len(data):
            raise CorruptObject(f"truncated fatbin: container at byte {pos} needs {end} bytes, has {len(data)}")
        at, unit = pos + header_size, []
        while at < end:
            entry, at = _parse_entry(data, at, end)
            unit.append(entry)
        units.append(unit)
        pos = end
    return units


# ---- ELF files ------------------------------------------------------------------------------------
def _raw_cubin_arch(elf: ELFFile) -> CudaArch:
    """A raw cubin: number from e_flags, suffix from the ptxas command line in .note.nv.tkinfo."""
    note = elf.get_section_by_name(".note.nv.tkinfo")
    if note is not None:
        m = re.search(rb"-arch[ =]+sm_(\d+[af]?)", note.data())
        if m:
            return CudaArch.parse(m.group(1).decode())
    flags = elf.header["e_flags"]
    number = (flags >> 8) & 0xFF if elf.header["e_ident"]["EI_ABIVERSION"] >= 8 else flags & 0xFF
    return _arch_from_number(number, 0)


def _object_units(elf: ELFFile) -> list[list[FatbinEntry]]:
    if elf.header["e_machine"] in ("EM_CUDA", EM_CUDA):
        return [[FatbinEntry("cubin", _raw_cubin_arch(elf), None)]]
    units: list[list[FatbinEntry]] = []
    for section in elf.iter_sections():
        if section.name in FATBIN_SECTIONS and section["sh_type"] != "SHT_NOBITS":
            units.extend(parse_fatbin_units(section.data()))
    return units


def _count_units(units: list[list[FatbinEntry]]) -> Units:
    counts: dict[tuple[CudaArch, ...], int] = {}
    for unit in units:
        archs = tuple(sorted({e.arch for e in unit if e.kind == "cubin"}))
        counts[archs] = counts.get(archs, 0) + 1
    return tuple(sorted(counts.items(), key=lambda item: -item[1]))


def inspect_elf(path: str, stream) -> ObjectReport:
    """Read one ELF file from a seekable binary stream; errors become ``ObjectReport.error``."""
    try:
        elf = ELFFile(stream)
        units = _object_units(elf)
        needed, driver_calls = _links(elf)
    except (ELFError, CorruptObject, struct.error, UsageError, ValueError, OSError) as exc:
        return ObjectReport(path, error=_one_line(exc))

    entries = [e for unit in units for e in unit]

    def archs(kind: str) -> tuple[CudaArch, ...]:
        return tuple(sorted({e.arch for e in entries if e.kind == kind}))

    codecs = tuple(sorted({e.compression for e in entries if e.compression}))
    return ObjectReport(path, archs("cubin"), archs("ptx"), None, archs("lto"), codecs, _count_units(units),
                        needed, driver_calls)


DRIVER_SYMBOL = re.compile(r"cu[A-Z]\w*")     # the driver API (cuLaunchKernel); cudaXxx is the runtime


def _links(elf: ELFFile) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(DT_NEEDED entries, undefined dynamic symbols that are CUDA driver functions)."""
    dynamic, dynsym = elf.get_section_by_name(".dynamic"), elf.get_section_by_name(".dynsym")
    needed = tuple(t.needed for t in dynamic.iter_tags() if t.entry.d_tag == "DT_NEEDED") if dynamic else ()
    calls = sorted({sym.name for sym in dynsym.iter_symbols()
                    if sym["st_shndx"] == "SHN_UNDEF" and DRIVER_SYMBOL.fullmatch(sym.name)}) if dynsym else []
    return needed, tuple(calls)


def _one_line(exc: BaseException) -> str:
    text = str(exc).replace("\n", " ").strip() or type(exc).__name__
    if isinstance(exc, (ELFError, struct.error)):
        return f"not a readable ELF file (truncated or corrupt): {text}"
    return text


# ---- inputs: file, folder, wheel, installed package -------------------------------------------------
def _is_elf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == ELF_MAGIC
    except OSError:
        return False


def _inspect_file(path: Path, label: str) -> ObjectReport:
    with open(path, "rb") as f:
        return inspect_elf(label, f)


def _walk(root: Path) -> Iterator[Path]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder, name)
            if path.is_file() and not path.is_symlink():
                yield path


def _inspect_folder(root: Path) -> tuple[ObjectReport, ...]:
    return tuple(_inspect_file(p, p.relative_to(root).as_posix()) for p in _walk(root) if _is_elf_file(p))


def _inspect_zip(path: Path) -> tuple[ObjectReport, ...]:
    reports = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if info.is_dir():
                continue
            with zf.open(info) as member:
                if member.read(4) != ELF_MAGIC:
                    continue
            try:  # read whole: a compressed zip member is not cheaply seekable
                data = zf.read(info)
            except (zipfile.BadZipFile, OSError) as exc:
                reports.append(ObjectReport(info.filename, error=f"unreadable wheel member: {exc}"))
                continue
            reports.append(inspect_elf(info.filename, io.BytesIO(data)))
    return tuple(reports)


def _inspect_distribution(name: str) -> tuple[str, tuple[ObjectReport, ...]] | None:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return None
    reports = []
    for file in dist.files or ():
        located = Path(dist.locate_file(file))
        if located.is_file() and _is_elf_file(located):
            reports.append(_inspect_file(located, str(file)))
    return f"{dist.metadata['Name']} {dist.version}", tuple(reports)


def inspect_path(path: str | os.PathLike) -> InspectReport:
    """CUDA code in a wheel, an ELF file, a folder (recursively) or an installed package (by name)."""
    p = Path(path)
    if p.is_dir():
        return InspectReport(str(p), _inspect_folder(p))
    if p.is_file():
        if zipfile.is_zipfile(p):
            try:
                return InspectReport(str(p), _inspect_zip(p))
            except zipfile.BadZipFile as exc:
                raise UsageError(f"{p}: not a readable wheel ({exc})") from None
        if not _is_elf_file(p):
            raise UsageError(f"{p}: not an ELF file, wheel or folder; nothing to inspect")
        return InspectReport(str(p), (_inspect_file(p, str(p)),))
    found = _inspect_distribution(str(path))
    if found is None:
        raise UsageError(f"{path}: no such file, folder or installed package")
    return InspectReport(*found)
