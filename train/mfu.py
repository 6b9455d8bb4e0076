"""Peak FLOP/s of a device, the denominator of model FLOPs utilisation (MFU): re-exported from model.accelerator,
where every vendor-specific query lives."""

from model.accelerator import GPU_BF16_PEAK_FLOPS, measured_matmul_flops, peak_flops

__all__ = ["GPU_BF16_PEAK_FLOPS", "measured_matmul_flops", "peak_flops"]
