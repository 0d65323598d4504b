"""Device peaks and MFU: the dense BF16 tensor-core peak of known GPUs (from their datasheets), a
measured fp32 matmul peak elsewhere (the CPU), and model FLOPs utilisation over either.

Layer: part of :mod:`fusiontrain.flops`; imports torch only.
"""

from __future__ import annotations

import functools
import math
import re
import time

import torch

__all__ = ["PEAK_FLOPS", "device_peak_flops", "measure_matmul_flops", "mfu", "peak_flops_for_name"]


def mfu(flops_per_step: float, step_time_s: float, peak_flops_per_device: float, num_devices: int = 1) -> float:
    """Model FLOPs utilisation: ``flops_per_step / (step_time_s * peak_flops_per_device * num_devices)``.

    ``flops_per_step`` is the FLOPs of the whole step on all ``num_devices`` devices (the sum of
    :func:`fusiontrain.flops.count.step_flops` over every micro-batch of every rank); pass one rank's FLOPs with
    ``num_devices=1`` for that rank's MFU.
    """
    if step_time_s <= 0:
        raise ValueError(f"step_time_s must be > 0, got {step_time_s}")
    if peak_flops_per_device <= 0:
        raise ValueError(f"peak_flops_per_device must be > 0, got {peak_flops_per_device}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return flops_per_step / (step_time_s * peak_flops_per_device * num_devices)

# -- peak FLOP/s ----------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) BF16 tensor-core peak per GPU, in FLOP/s. NVIDIA's datasheets quote
# sparse figures, twice these.
PEAK_FLOPS: dict[str, float] = {
    # H100 SXM5: 989.4 TFLOPS dense BF16 (1978.9 with sparsity), NVIDIA H100 Tensor Core GPU
    # Architecture whitepaper, table "H100 SXM5"; = 528 tensor cores x 1024 FLOP/clock x 1.83 GHz.
    "H100 SXM": 989.4e12,
    # H200 (SXM): datasheet "BF16 Tensor Core 1,979 TFLOPS" with sparsity -> ~989.5 dense; the same
    # GH100 compute as H100 SXM (only the memory differs), so the whitepaper's 989.4.
    "H200": 989.4e12,
    # A100: 312 TFLOPS dense BF16 (624 with sparsity), NVIDIA A100 datasheet; the same for the
    # SXM4 80GB / 40GB and PCIe variants.
    "A100": 312e12,
    # B200 (HGX B200, 1000 W): 2.25 PFLOPS dense BF16 (4.5 PFLOPS per GPU with sparsity; HGX B200
    # 8-GPU board: 36 PFLOPS sparse), NVIDIA Blackwell datasheet.
    "B200": 2.25e15,
}

# torch.cuda.get_device_name() -> table entry; first match wins. Names seen in the wild: "NVIDIA
# H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA B200".
# Word boundaries keep "GH200" / "GB200" (other peaks) from matching "H200" / "B200".
_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bh100\b"), "H100 SXM"),
    (re.compile(r"\bh200\b"), "H200"),
    (re.compile(r"\ba100\b"), "A100"),
    (re.compile(r"\bb200\b"), "B200"),
)
# Variants whose peak differs from the table's: H100 PCIe / NVL and H200 NVL run lower clocks and
# power; a MIG slice has a fraction of the SMs.
_OTHER_VARIANTS = {"H100 SXM": re.compile(r"\b(pcie|nvl)\b"), "H200": re.compile(r"\bnvl\b")}
_MIG = re.compile(r"\bmig\b")

def peak_flops_for_name(name: str) -> float:
    """Dense BF16 peak FLOP/s of the GPU called ``name`` (``torch.cuda.get_device_name()``).

    Raises:
        ValueError: for a GPU (or a variant, or a MIG slice) not in :data:`PEAK_FLOPS`.
    """
    lowered = name.lower()
    if not _MIG.search(lowered):
        for pattern, key in _NAME_PATTERNS:
            if pattern.search(lowered):
                variant = _OTHER_VARIANTS.get(key)
                if variant is None or not variant.search(lowered):
                    return PEAK_FLOPS[key]
                break
    raise ValueError(
        f"no peak FLOP/s known for GPU {name!r} (known: {', '.join(PEAK_FLOPS)}); pass the peak explicitly"
    )

@functools.lru_cache(maxsize=None)
def measure_matmul_flops(
    device: str = "cpu", *, size: int = 1024, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    """Best FLOP/s of ``repeats`` ``[size, size] @ [size, size]`` matmuls on ``device``.

    A *measured*, not a nominal, peak: what this process achieves on a large matmul with its
    current threads, dtype and clocks (about 0.1 s on a CPU). Cached per process, so it is
    measured once, at the first call.
    """
    target = torch.device(device)
    a = torch.randn(size, size, device=target, dtype=dtype)
    b = torch.randn(size, size, device=target, dtype=dtype)
    out = torch.empty(size, size, device=target, dtype=dtype)

    def sync() -> None:
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    torch.mm(a, b, out=out)  # warm up
    sync()
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best

def device_peak_flops(device: torch.device | str | int | None = None) -> float:
    """Peak FLOP/s of one ``device``.

    CUDA: the dense BF16 entry of :data:`PEAK_FLOPS` matched against
    ``torch.cuda.get_device_name(device)`` (ValueError for an unknown GPU). CPU: a matmul peak
    *measured* now (fp32, :func:`measure_matmul_flops`), not a nominal figure, so MFU on a CPU is
    relative to the best this machine showed on a large matmul.

    Args:
        device: a device, its name or CUDA index; None for the current CUDA device, or the CPU
            when CUDA is unavailable.
    """
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    elif isinstance(device, int):
        device = torch.device("cuda", device)
    device = torch.device(device)
    if device.type == "cuda":
        return peak_flops_for_name(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_matmul_flops("cpu")
    raise ValueError(f"no peak FLOP/s for a {device.type} device")
