"""The one place that knows accelerator vendors: device choice, dtypes, memory statistics, synchronisation, RNG state,
kernel support and peak FLOP/s. Everything else asks here instead of naming a device type.

Built on torch's vendor-neutral `torch.accelerator` (CUDA, ROCm, which torch reports as cuda, XPU, MPS, ...); the
per-vendor module (`torch.get_device_module`) only where `torch.accelerator` has no equivalent. No deepspeed import,
so model/ can use it. CPU is the fallback everywhere: memory there is the process's resident set size.
"""

from __future__ import annotations

import ctypes
import functools
import os
import resource
import time

import torch

# Device type of NVIDIA and AMD (ROCm) GPUs alike; the only spelling of it in the package.
CUDA = "cuda"

# Dense (no sparsity) bf16 tensor-core peaks from vendor datasheets, matched by substring of the device name, first
# match wins. Used for fp32 runs too: MFU is quoted against the bf16 peak whatever the run's precision.
GPU_BF16_PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),  # also GH200
    ("A100", 312e12),
    ("MI300X", 1307e12),  # "AMD Instinct MI300X"
)


# Variables through which a scheduler or a user hands a job its GPUs (ROCm's spellings included).
GPU_REQUEST_VARIABLES = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "SLURM_GPUS",
    "SLURM_GPUS_ON_NODE",
    "SLURM_STEP_GPUS",
    "SLURM_JOB_GPUS",
    "GPU_DEVICE_ORDINAL",
)
# Values that give no device: unset or empty, CUDA's "-1", SLURM's "NoDevFiles" (a job without GPUs); for the
# variables that hold a count rather than device indices, also 0.
NO_DEVICE_VALUES = ("", "-1", "nodevfiles", "none")
GPU_COUNT_VARIABLES = ("SLURM_GPUS", "SLURM_GPUS_ON_NODE")


def gpus_requested(environ=None) -> tuple[str, str] | None:
    """The first (variable, value) of GPU_REQUEST_VARIABLES that gives this job devices, or None. An explicit
    no-device CUDA_VISIBLE_DEVICES (empty, -1, NoDevFiles) says "no GPUs" whatever else is set."""
    environ = os.environ if environ is None else environ
    if environ.get("CUDA_VISIBLE_DEVICES", "x").strip().lower() in NO_DEVICE_VALUES:
        return None
    for name in GPU_REQUEST_VARIABLES:
        value = environ.get(name, "").strip()
        if value.lower() not in NO_DEVICE_VALUES and not (name in GPU_COUNT_VARIABLES and value == "0"):
            return name, value
    return None


def check_requested_gpus(environ=None) -> None:
    """Refuse (ValueError) to run on CPU when the job was given GPUs that torch cannot use: a CPU build of torch
    (e.g. installed on a login node without GPUs) would otherwise train on CPU with gloo without a word."""
    requested = gpus_requested(environ)
    if requested is None or has_accelerator():
        return
    name, value = requested
    if torch.version.cuda is None and torch.version.hip is None:
        why = f"torch {torch.__version__} is a CPU-only build: reinstall with `make install DEVICE=cuda`"
    else:
        why = f"torch {torch.__version__} sees no GPU: check the node's driver (nvidia-smi / rocm-smi)"
    raise ValueError(
        f"{name}={value} gives this job GPUs, but {why} (or set CUDA_VISIBLE_DEVICES=-1 to train on CPU on purpose)"
    )


def device_type() -> str:
    """The available accelerator's device type ("cuda", "xpu", "mps", ...), else "cpu"."""
    acc = torch.accelerator.current_accelerator(check_available=True)
    return acc.type if acc is not None else "cpu"


def has_accelerator() -> bool:
    """Whether an accelerator is available to this process."""
    return torch.accelerator.is_available()


def device_count() -> int:
    """Number of accelerator devices visible to this process (0 without one)."""
    return torch.accelerator.device_count() if has_accelerator() else 0


def local_device(local_rank: int = 0) -> torch.device:
    """The accelerator device of this local rank, made the current one; cpu without an accelerator."""
    if not has_accelerator():
        return torch.device("cpu")
    torch.accelerator.set_device_index(local_rank)
    return torch.device(device_type(), local_rank)


def resolve_device(spec: str = "auto") -> torch.device:
    """torch.device(spec), where spec "auto" means the accelerator if there is one, else cpu."""
    return torch.device(device_type() if spec == "auto" else spec)


def is_accelerator(device: torch.device | str) -> bool:
    """Whether `device` is an accelerator (not cpu, not meta)."""
    return torch.device(device).type not in ("cpu", "meta")


def default_dtype(device: torch.device | str) -> torch.dtype:
    """Training dtype when none is configured: bf16 on an accelerator, fp32 on CPU."""
    return torch.bfloat16 if is_accelerator(device) else torch.float32


def comm_backend(device: torch.device | str) -> str:
    """torch.distributed backend for `device`: nccl (NVIDIA and ROCm's rccl), xccl (XPU), hccl (Gaudi), else gloo."""
    kind = torch.device(device).type
    if kind == CUDA:
        return "nccl"
    # Attribute access, not an import: torch imports torch.distributed itself; older builds lack the query.
    if kind == "xpu" and getattr(torch.distributed, "is_xccl_available", lambda: False)():
        return "xccl"
    if kind == "hpu":
        return "hccl"
    return "gloo"


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work; a no-op on CPU."""
    if is_accelerator(device):
        torch.accelerator.synchronize(torch.device(device))


def memory_in_use_gb(device: torch.device | str) -> float:
    """Memory in use now (GiB): accelerator memory allocated, or on CPU the process's resident set size."""
    device = torch.device(device)
    if is_accelerator(device):
        return torch.accelerator.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak memory (GiB) since the last reset: accelerator max allocated, or on CPU the process's peak RSS."""
    device = torch.device(device)
    if is_accelerator(device):
        return torch.accelerator.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak window: the allocator's peak on an accelerator; on Linux CPU the max-RSS high-water mark
    restarts at the current RSS (best effort: unchanged where /proc/self/clear_refs is not writable)."""
    device = torch.device(device)
    if is_accelerator(device):
        torch.accelerator.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def empty_cache(device: torch.device | str) -> None:
    """Return freed memory: the accelerator allocator's cached blocks, or on CPU glibc's freed heap pages (glibc
    keeps them resident, so a following RSS window would start high)."""
    if is_accelerator(device):
        torch.accelerator.empty_cache()
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_kind(device: torch.device | str) -> str:
    """What a benchmark's peak memory figure measures on `device`, e.g. "cuda_max_memory_allocated"."""
    kind = torch.device(device).type
    return f"{kind}_max_memory_allocated" if is_accelerator(kind) else "cpu_max_rss_delta"


def device_name(device: torch.device | str) -> str:
    """The accelerator's product name (e.g. "NVIDIA H100 80GB HBM3"), its type where the vendor module has no name
    query, or "cpu"."""
    device = torch.device(device)
    if not is_accelerator(device):
        return "cpu"
    get_name = getattr(torch.get_device_module(device.type), "get_device_name", None)
    return get_name(device) if get_name is not None else device.type


def peak_flops(device: torch.device | str, threads: int | None = None) -> float:
    """Peak FLOP/s for MFU: the bf16 dense datasheet figure on known GPUs, a measured matmul rate otherwise.

    CPU peak is measured, not nominal: the best fp32 rate of 1024x1024 matmuls over a few rounds with `threads`
    torch threads (default: the current count; restored afterwards), so CPU MFU reads as "fraction of what this
    machine's matmul achieves with the threads a rank has". Unknown accelerators are measured in bf16.
    """
    device = torch.device(device)
    if is_accelerator(device):
        name = device_name(device)
        for key, flops in GPU_BF16_PEAK_FLOPS:
            if key in name:
                return flops
        return measured_matmul_flops(str(device), torch.bfloat16)
    return cpu_matmul_flops(threads or torch.get_num_threads())


@functools.cache
def cpu_matmul_flops(threads: int, rounds: int = 4) -> float:
    """Best fp32 matmul FLOP/s on CPU with `threads` intra-op threads, over `rounds` measurements (other work on the
    machine only slows a round down, so the fastest is the closest to the machine's rate). One figure per thread
    count: a rank measured with another count would misstate its MFU."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return max(measured_matmul_flops.__wrapped__("cpu", torch.float32) for _ in range(rounds))
    finally:
        torch.set_num_threads(before)


@functools.cache
def measured_matmul_flops(device: str, dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of repeated (n, n) @ (n, n) matmuls over about `seconds`, after a short warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    warm_until = time.perf_counter() + seconds / 3  # thread pool spin-up and clock ramp are not the machine's rate
    while time.perf_counter() < warm_until:
        a @ b
    synchronize(device)
    iters, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(4):  # a few per clock read so the timer is noise, not the work
            a @ b
        synchronize(device)
        iters += 4
    return 2.0 * n**3 * iters / elapsed


def fp8_supported(device: torch.device | str | None = None) -> bool:
    """Whether `device` (default: the current accelerator) has FP8 tensor cores: CUDA compute capability >= 8.9
    (Ada, Hopper and newer; ROCm's MI300 reports 9.4)."""
    device = torch.device(device) if device is not None else torch.device(device_type())
    if device.type != CUDA or not has_accelerator():
        return False
    # torch.accelerator's capability query lists dtypes only; the compute capability is vendor-module API.
    return torch.get_device_module(CUDA).get_device_capability(device) >= (8, 9)


def rng_state() -> dict[str, torch.Tensor] | None:
    """The current accelerator's RNG state keyed by its device type ("cuda" as in older checkpoints), or None."""
    if not has_accelerator():
        return None
    kind = device_type()
    get_state = getattr(torch.get_device_module(kind), "get_rng_state", None)
    return {kind: get_state()} if get_state is not None else None


def set_rng_state(state: dict | None) -> None:
    """Restore the accelerator RNG entry of `state` (rng_state()'s, or a checkpoint dict holding it); entries of
    another device type, or any entry without an accelerator, are ignored."""
    if not state or not has_accelerator():
        return
    kind = device_type()
    if kind in state:
        torch.get_device_module(kind).set_rng_state(state[kind])


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes x's device and dtype: CPU in any dtype; CUDA only in bf16 (or under bf16
    autocast), its grouped GEMM being bf16-only. Does not check that torch has _grouped_mm."""
    if x.device.type == CUDA:
        return torch.is_autocast_enabled(CUDA) or x.dtype == torch.bfloat16
    return x.device.type == "cpu"


def compiles_flex(device: torch.device | str) -> bool:
    """Whether FlexAttention and its block masks are torch.compile-d on `device`: on CUDA, where compiled flex is a
    fused kernel that skips masked tiles; elsewhere eager (which has no backward on CPU)."""
    return torch.device(device).type == CUDA


def fused_adamw(device: torch.device | str) -> bool:
    """Whether to ask for AdamW's fused kernel on `device`: on accelerators that have one (never on CPU)."""
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    kind = torch.device(device).type
    return is_accelerator(kind) and kind in _get_fused_kernels_supported_devices()
