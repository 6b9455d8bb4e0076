"""model.accelerator: sane CPU values from every query, the GPU paths where one is present, and no device-type
string for a vendor anywhere else in the package."""

from __future__ import annotations

import io
import tokenize
from pathlib import Path

import pytest
import torch

from model import accelerator as acc

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("model", "train", "launch", "data_pipeline", "tokenizer")
CPU = torch.device("cpu")
gpu = pytest.mark.skipif(not acc.has_accelerator(), reason="needs an accelerator")


@pytest.mark.skipif(acc.has_accelerator(), reason="CPU-only values")
def test_cpu_answers():
    assert acc.device_type() == "cpu" and not acc.has_accelerator() and acc.device_count() == 0
    assert acc.local_device(0) == CPU and acc.local_device(3) == CPU
    assert acc.resolve_device() == CPU and acc.resolve_device("auto") == CPU
    assert acc.rng_state() is None
    acc.set_rng_state({"cuda": torch.zeros(8, dtype=torch.uint8)})  # a GPU checkpoint's entry, ignored on CPU
    assert not acc.fp8_supported() and not acc.fp8_supported("cpu")


def test_device_properties():
    assert acc.resolve_device("cpu") == CPU and acc.resolve_device("meta") == torch.device("meta")
    assert not acc.is_accelerator(CPU) and not acc.is_accelerator("meta") and acc.is_accelerator("cuda:1")
    assert acc.default_dtype(CPU) == torch.float32 and acc.default_dtype("cuda") == torch.bfloat16
    assert acc.comm_backend(CPU) == "gloo" and acc.comm_backend("cuda:0") == "nccl"
    assert acc.comm_backend("xpu") in ("xccl", "gloo") and acc.comm_backend("mps") == "gloo"
    assert acc.device_name(CPU) == "cpu"
    assert acc.peak_memory_kind(CPU) == "cpu_max_rss_delta"
    assert acc.peak_memory_kind("cuda:0") == "cuda_max_memory_allocated"
    assert acc.peak_memory_kind("xpu") == "xpu_max_memory_allocated"
    assert not acc.fused_adamw(CPU) and acc.fused_adamw("cuda")
    assert acc.compiles_flex("cuda:0") and not acc.compiles_flex(CPU)


def test_cpu_memory_is_the_process_rss():
    acc.synchronize(CPU)
    # The kernel batches RSS counters per thread, so the peak can trail the current RSS by a few pages.
    slack = 2**-8  # 4 MiB
    now, peak = acc.memory_in_use_gb(CPU), acc.peak_memory_gb(CPU)
    assert 0 < now <= peak + slack and peak < 1024
    acc.reset_peak_memory(CPU)
    acc.empty_cache(CPU)
    block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, touched: resident
    assert acc.peak_memory_gb(CPU) + slack >= acc.memory_in_use_gb(CPU) >= now + 0.2
    del block


def test_grouped_mm_support_follows_device_and_dtype():
    assert acc.grouped_mm_supported(torch.zeros(2, dtype=torch.float32))
    assert acc.grouped_mm_supported(torch.zeros(2, dtype=torch.bfloat16))
    assert not acc.grouped_mm_supported(torch.zeros(2, device="meta"))


def test_cpu_peak_flops_is_measured():
    assert acc.peak_flops(CPU) == acc.peak_flops("cpu") > 1e8  # cached: one measurement per thread count
    assert acc.measured_matmul_flops("cpu", torch.float32, n=64, seconds=0.01) > 0


def test_cpu_peak_is_measured_with_the_threads_a_rank_has():
    before = torch.get_num_threads()
    seen = []
    real = acc.measured_matmul_flops.__wrapped__

    def spy(*args, **kwargs):  # records the thread count each measurement ran with
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    acc.cpu_matmul_flops.cache_clear()
    try:
        acc.measured_matmul_flops.__wrapped__ = spy
        one = acc.peak_flops("cpu", threads=1)
        two = acc.peak_flops("cpu", threads=2)
        assert acc.peak_flops("cpu", threads=1) == one  # one figure per thread count, not per device
    finally:
        acc.measured_matmul_flops.__wrapped__ = real
    assert seen == [1] * 4 + [2] * 4, seen  # each figure is the best of 4 rounds at its own thread count
    assert torch.get_num_threads() == before, "the caller's thread count is restored"
    assert one > 1e8 and two > 1e8
    assert acc.cpu_matmul_flops.cache_info().currsize == 2


def _vendor_tokens(path: Path) -> list[str]:
    """file:line of each name or string literal naming the cuda device type (comments may name the vendor)."""
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.NAME, tokenize.STRING) and "cuda" in tok.string:
            hits.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.string[:60]}")
    return hits


def test_no_device_type_strings_outside_the_accelerator_module():
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    assert len(files) > 50
    checked = [p for p in files if str(p.relative_to(ROOT)) != "model/accelerator.py"]
    assert [hit for p in checked for hit in _vendor_tokens(p)] == []


def test_model_package_needs_no_distributed_stack():
    for path in sorted((ROOT / "model").glob("*.py")):
        text = path.read_text()
        assert "import deepspeed" not in text and "import torch.distributed" not in text, path
        assert "from torch.distributed" not in text and "from deepspeed" not in text, path


@pytest.mark.gpu
@gpu
def test_accelerator_answers_on_gpu():
    device = acc.local_device(0)
    assert acc.is_accelerator(device) and device.type == acc.device_type() and acc.device_count() >= 1
    assert acc.resolve_device() == torch.device(acc.device_type())
    assert acc.default_dtype(device) == torch.bfloat16 and acc.device_name(device) not in ("", "cpu")
    acc.empty_cache(device)
    acc.reset_peak_memory(device)
    before = acc.memory_in_use_gb(device)
    x = torch.ones(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    acc.synchronize(device)
    assert acc.memory_in_use_gb(device) - before >= 0.25 and acc.peak_memory_gb(device) >= 0.25
    del x
    acc.reset_peak_memory(device)
    assert acc.peak_memory_gb(device) < 0.25 + before
    assert acc.peak_flops(device) > 1e12
    assert acc.peak_memory_kind(device) == f"{device.type}_max_memory_allocated"


@pytest.mark.gpu
@gpu
def test_accelerator_rng_round_trip():
    state = acc.rng_state()
    assert state is not None and list(state) == [acc.device_type()]
    device = acc.local_device(0)
    first = torch.rand(4, device=device)
    acc.set_rng_state(state)
    assert torch.equal(torch.rand(4, device=device), first)


@pytest.mark.gpu
@pytest.mark.skipif(acc.device_type() != "cuda", reason="needs CUDA")
def test_cuda_specific_answers():
    device = acc.local_device(0)
    assert acc.comm_backend(device) == "nccl" and acc.compiles_flex(device)
    assert acc.grouped_mm_supported(torch.zeros(2, device=device, dtype=torch.bfloat16))
    assert not acc.grouped_mm_supported(torch.zeros(2, device=device))
    major, minor = torch.cuda.get_device_capability(device)
    assert acc.fp8_supported(device) == ((major, minor) >= (8, 9))


@pytest.mark.parametrize(
    "env, named",
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, "CUDA_VISIBLE_DEVICES"),
        ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES"),  # device 0, not a count
        ({"SLURM_GPUS_ON_NODE": "4"}, "SLURM_GPUS_ON_NODE"),
        ({"SLURM_JOB_GPUS": "0,1,2,3"}, "SLURM_JOB_GPUS"),
        ({"SLURM_STEP_GPUS": "2"}, "SLURM_STEP_GPUS"),
        ({"SLURM_GPUS": "8"}, "SLURM_GPUS"),
        ({"GPU_DEVICE_ORDINAL": "0"}, "GPU_DEVICE_ORDINAL"),
        ({"CUDA_VISIBLE_DEVICES": ""}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None),
        ({"CUDA_VISIBLE_DEVICES": "-1", "SLURM_JOB_GPUS": "0"}, None),  # the user chose CPU on a GPU job
        ({"SLURM_GPUS_ON_NODE": "0"}, None),
        ({}, None),
    ],
)
def test_gpus_requested_reads_the_scheduler_variables(env, named):
    found = acc.gpus_requested(env)
    assert (found[0] if found else None) == named


@pytest.mark.skipif(acc.has_accelerator(), reason="the refusal is for a torch that cannot use the GPUs")
def test_requested_gpus_without_a_usable_accelerator_are_refused():
    with pytest.raises(ValueError, match=r"SLURM_JOB_GPUS=0,1 gives this job GPUs.*DEVICE=cuda"):
        acc.check_requested_gpus({"SLURM_JOB_GPUS": "0,1"})
    acc.check_requested_gpus({"CUDA_VISIBLE_DEVICES": "NoDevFiles"})  # no GPUs given: nothing to refuse
