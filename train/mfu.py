"""Peak FLOP/s of a device, the denominator of model FLOPs utilisation (MFU)."""

from __future__ import annotations

import functools
import time

import torch

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets, matched by substring of the device name,
# first match wins. Used for fp32 runs too: MFU is quoted against the bf16 peak whatever the run's precision.
GPU_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),
)


def peak_flops(device: torch.device | str) -> float:
    """Peak FLOP/s for MFU: the bf16 dense datasheet figure on known GPUs, a measured matmul rate otherwise.

    CPU peak is measured, not nominal: the fp32 rate of 1024x1024 matmuls on the current torch thread count, so CPU
    MFU reads as "fraction of what this machine's matmul achieves". Unknown GPUs are measured the same way in bf16.
    """
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS:
            if key in name:
                return flops
        return measured_matmul_flops(str(device), torch.bfloat16)
    return measured_matmul_flops(str(device), torch.float32)


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of repeated (n, n) @ (n, n) matmuls over about `seconds`, after a short warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    warm_until = time.perf_counter() + seconds / 3  # thread pool spin-up and clock ramp are not the machine's rate
    while time.perf_counter() < warm_until:
        a @ b
    sync()
    iters, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(4):  # a few per clock read so the timer is noise, not the work
            a @ b
        sync()
        iters += 4
    return 2.0 * n**3 * iters / elapsed
