"""Datasheet figures of the GPUs we build for and test on, to set next to measured ceilings.

Every number here is a *datasheet* (or vendor-stated) figure, never a measurement: the report labels
them so. Sources: the shared notes' target table (GB10, RTX 5090, RTX PRO 6000, H100 SXM) and NVIDIA's
H100 / H200 datasheets. ``None`` means no datasheet figure is recorded here; we do not guess one
(e.g. dense BF16 tensor throughput of the GeForce / RTX PRO / GB10 parts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..core.targets import ComputeCapability


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    cc: ComputeCapability
    sms: int
    memory_gb: float
    bandwidth_gbps: float                 # DRAM bandwidth, datasheet
    bf16_dense_tflops: float | None       # BF16 tensor core, dense (no sparsity), datasheet
    match: tuple[str, ...]                # lower-case substrings of torch.cuda.get_device_name()
    source: str

    def as_dict(self) -> dict:
        d = asdict(self)
        d["cc"] = str(self.cc)
        d["match"] = list(self.match)
        return d


def _cc(text: str) -> ComputeCapability:
    return ComputeCapability.parse(text)


# Order matters for matching: the more specific names first ("h100 pcie" before "h100").
DEVICES: tuple[DeviceSpec, ...] = (
    DeviceSpec("gb10", "NVIDIA GB10 (DGX Spark)", _cc("12.1"), 48, 128, 273, None, ("gb10",),
               "shared notes (NVIDIA DGX Spark figures); unified LPDDR5X"),
    DeviceSpec("rtx5090", "GeForce RTX 5090", _cc("12.0"), 170, 32, 1792, None, ("rtx 5090",),
               "shared notes (NVIDIA RTX 5090 specifications)"),
    DeviceSpec("rtxpro6000", "RTX PRO 6000 Blackwell", _cc("12.0"), 188, 96, 1792, None,
               ("rtx pro 6000",), "shared notes (NVIDIA RTX PRO 6000 Blackwell specifications)"),
    DeviceSpec("h100pcie", "H100 PCIe", _cc("9.0"), 114, 80, 2000, 756, ("h100 pcie",),
               "NVIDIA H100 datasheet (PCIe column; BF16 1,513 TFLOPS is with sparsity)"),
    DeviceSpec("h100sxm", "H100 SXM", _cc("9.0"), 132, 80, 3350, 989, ("h100",),
               "NVIDIA H100 datasheet (SXM column; BF16 1,979 TFLOPS is with sparsity)"),
    DeviceSpec("h200", "H200 SXM", _cc("9.0"), 132, 141, 4800, 989, ("h200",),
               "NVIDIA H200 datasheet (SXM column; BF16 1,979 TFLOPS is with sparsity)"),
)


def find_device(device_name: str) -> DeviceSpec | None:
    """The datasheet row for a device name as torch reports it, or None.

    >>> find_device("NVIDIA H100 80GB HBM3").key, find_device("NVIDIA GB10").key
    ('h100sxm', 'gb10')
    >>> find_device("NVIDIA H100 PCIe").key, find_device("Tesla T4") is None
    ('h100pcie', True)
    """
    lowered = device_name.lower()
    for spec in DEVICES:
        if any(m in lowered for m in spec.match):
            return spec
    return None
