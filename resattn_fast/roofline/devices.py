"""Datasheet figures of the GPUs the roofline model predicts for, with their sources.

Matrix rates are dense (no 2:4 sparsity): NVIDIA's Hopper datasheets print the sparse
figure, twice the dense one, with a footnote. ``torch._inductor.analysis.device_info``
ships the same datasheet figures for some of these GPUs; ``torch_datasheet()`` reads
them (where this torch has them) so the report can show both side by side.

Usable memory: the datasheet capacity is in GiB (80 GB = 5 x 16 GiB HBM stacks); the
driver reports about 1% less as ``total_memory`` (an H200 shows 139.8 GiB of 141). The
memory model also keeps a fixed margin for the CUDA context, cuDNN workspaces and the
caching allocator's fragmentation (see ``Gpu.usable_bytes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch

__all__ = ["Gpu", "GPUS", "lookup", "from_device_name", "torch_datasheet"]

_GIB = 2**30


@dataclass(frozen=True)
class Gpu:
    """One GPU: dense peak rates (TFLOP/s), DRAM bandwidth (GB/s = 1e9 B/s), memory (GiB)."""

    name: str
    matmul_tflops: Dict[str, float]  # tensor-core rate: "bfloat16", "float16", "tf32"
    fp32_tflops: float  # non-tensor-core float32 (matrix products without TF32)
    bandwidth_gbs: float
    memory_gib: float
    source: str
    launch_us: float = 4.0  # per kernel: launch and the gap between back-to-back kernels
    notes: List[str] = field(default_factory=list)
    overridden: Dict[str, str] = field(default_factory=dict)

    def matmul_rate(self, dtype: str, op: str) -> float:
        """FLOP/s of a convolution or matrix product whose output has ``dtype``.

        float32: convolutions run TF32 on the tensor cores (torch.backends.cudnn.allow_tf32
        is True by default); matrix products run full float32 (torch.backends.cuda.matmul
        .allow_tf32 is False by default)."""
        key = dtype.replace("torch.", "")
        if key == "float32":
            key = "tf32" if "convolution" in op else "float32"
        if key == "float32":
            return self.fp32_tflops * 1e12
        return self.matmul_tflops.get(key, self.fp32_tflops) * 1e12

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.bandwidth_gbs * 1e9

    @property
    def launch_s(self) -> float:
        return self.launch_us * 1e-6

    def usable_bytes(self) -> float:
        """What a training step may allocate: 99% of the capacity (what the driver
        reports), less 1.5 GiB (CUDA context, cuDNN workspaces), less 5% for the caching
        allocator's rounding and fragmentation."""
        return (0.99 * self.memory_gib * _GIB - 1.5 * _GIB) * 0.95

    def with_overrides(self, bandwidth_gbs: Optional[float] = None, matmul_tflops: Optional[float] = None,
                       launch_us: Optional[float] = None) -> Gpu:
        """The same GPU with measured figures in place of the datasheet's."""
        g = self
        over = dict(self.overridden)
        if bandwidth_gbs is not None:
            over["bandwidth"] = f"{bandwidth_gbs:g} GB/s (given; datasheet {self.bandwidth_gbs:g})"
            g = replace(g, bandwidth_gbs=float(bandwidth_gbs))
        if matmul_tflops is not None:
            over["matrix rate"] = (f"{matmul_tflops:g} TFLOP/s for every convolution and matrix product "
                                   f"(given; datasheet {self.matmul_tflops})")
            g = replace(g, matmul_tflops={k: float(matmul_tflops) for k in self.matmul_tflops},
                        fp32_tflops=float(matmul_tflops))
        if launch_us is not None:
            over["launch"] = f"{launch_us:g} us per kernel (given; default {self.launch_us:g})"
            g = replace(g, launch_us=float(launch_us))
        return replace(g, overridden=over)


GPUS: Dict[str, Gpu] = {
    "H100": Gpu(
        name="H100 SXM5 80GB", matmul_tflops={"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7},
        fp32_tflops=66.9, bandwidth_gbs=3350.0, memory_gib=80.0,
        source="NVIDIA H100 Tensor Core GPU datasheet, SXM5 column (https://www.nvidia.com/en-us/data-center/h100/): "
               "BF16 1,979 / TF32 989 TFLOPS with sparsity (dense: half), FP32 67 TFLOPS, HBM3 3.35 TB/s, 80 GB"),
    "H100-PCIe": Gpu(
        name="H100 PCIe 80GB", matmul_tflops={"bfloat16": 756.5, "float16": 756.5, "tf32": 378.0},
        fp32_tflops=51.2, bandwidth_gbs=2000.0, memory_gib=80.0,
        source="NVIDIA H100 Tensor Core GPU datasheet, PCIe column (https://www.nvidia.com/en-us/data-center/h100/): "
               "BF16 1,513 / TF32 756 TFLOPS with sparsity (dense: half), FP32 51 TFLOPS, HBM2e 2 TB/s, 80 GB"),
    "H200": Gpu(
        name="H200 SXM 141GB", matmul_tflops={"bfloat16": 989.4, "float16": 989.4, "tf32": 494.7},
        fp32_tflops=66.9, bandwidth_gbs=4800.0, memory_gib=141.0,
        source="NVIDIA H200 Tensor Core GPU datasheet, SXM column (https://www.nvidia.com/en-us/data-center/h200/): "
               "BF16 1,979 / TF32 989 TFLOPS with sparsity (dense: half), FP32 67 TFLOPS, HBM3e 4.8 TB/s, 141 GB"),
    "A100": Gpu(
        name="A100 SXM4 80GB", matmul_tflops={"bfloat16": 312.0, "float16": 312.0, "tf32": 156.0},
        fp32_tflops=19.5, bandwidth_gbs=2039.0, memory_gib=80.0,
        source="NVIDIA A100 Tensor Core GPU datasheet, 80GB SXM column (https://www.nvidia.com/content/dam/en-zz/"
               "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): BF16 312 / "
               "TF32 156 TFLOPS dense, FP32 19.5 TFLOPS, HBM2e 2,039 GB/s, 80 GB"),
}


def lookup(name: str) -> Gpu:
    """The table's entry for ``name`` (H100, H100-PCIe, H200, A100; any case); KeyError if none."""
    for key, gpu in GPUS.items():
        if key.lower() == name.strip().lower():
            return gpu
    raise KeyError(name)


def from_device_name(device_name: str) -> Optional[Gpu]:
    """Map ``torch.cuda.get_device_name()`` (e.g. "NVIDIA H100 80GB HBM3", "NVIDIA
    A100-SXM4-80GB", "NVIDIA H200") to the table, or None if it is not in it."""
    n = device_name.upper()
    if "H200" in n:
        return GPUS["H200"]
    if "H100" in n:
        return GPUS["H100-PCIe"] if "PCIE" in n else GPUS["H100"]
    if "A100" in n:
        return GPUS["A100"]
    return None


def torch_datasheet(gpu_key: str) -> Optional[str]:
    """What this torch's ``torch._inductor.analysis.device_info`` says about the GPU (a
    private module whose table and fields differ between releases: read defensively)."""
    try:
        from torch._inductor.analysis import device_info as di
    except Exception:
        return None
    mapping = getattr(di, "_device_mapping", {})
    entry = mapping.get("NVIDIA " + gpu_key.split("-")[0].upper())
    if entry is None:
        return None
    tops = getattr(entry, "tops", {})
    factor = getattr(entry, "tops_sparsity_factor", None)
    bf16 = tops.get(torch.bfloat16)
    sparsity = (f", sparsity factor {factor} (dense {bf16 / factor:g})" if factor and bf16 else
                ", no sparsity factor in this release's table")
    return (f"torch {torch.__version__} device_info: bf16 {bf16} TFLOPS{sparsity}, "
            f"DRAM {getattr(entry, 'dram_bw_gbs', '?')} GB/s, {getattr(entry, 'dram_gb', '?')} GB")
