"""Model transforms applied after the model is built and before DeepSpeed wraps it: FP8 linears, then torch.compile
of each decoder block. Neither changes parameter names, so checkpoints and exports are unaffected.

No deepspeed import here: `train.bench` uses these too, on machines without DeepSpeed.
"""

from __future__ import annotations

from torch import nn

from model.accelerator import fp8_supported
from model.transformer import Block

FP8_MISSING = (
    "execution.fp8=true needs torchao (float8 training): `pip install torchao` on a CUDA machine with an FP8 GPU "
    "(Hopper or newer), or set execution.fp8=false"
)


def check_fp8() -> None:
    """Raise one clear error unless torchao's float8 training and an FP8-capable CUDA GPU are available."""
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise ValueError(FP8_MISSING) from e
    if not fp8_supported():
        raise ValueError("execution.fp8=true needs a CUDA GPU with FP8 tensor cores (sm_89 / Hopper or newer)")


def convert_fp8(model: nn.Module) -> nn.Module:
    """Swap the block linears to torchao Float8Linear (tensorwise dynamic scaling); the output head stays bf16.

    Linears whose dimensions are not multiples of 16 (FP8 GEMM requirement) and MoE routers stay as they are.
    """
    check_fp8()
    from torchao.float8 import convert_to_float8_training

    def keep(module: nn.Module, fqn: str) -> bool:
        if fqn == "lm_head" or fqn.endswith("gate"):
            return False
        return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0

    return convert_to_float8_training(model, module_filter_fn=keep)


def compile_blocks(model: nn.Module) -> nn.Module:
    """torch.compile every decoder block (and MTP block) in place: one compiled graph reused across layers, names and
    state dicts unchanged, so DeepSpeed and checkpoints see the same module."""

    for module in model.modules():
        if isinstance(module, Block):
            module.compile()
    return model


def optimize_model(model: nn.Module, compile: bool, fp8: bool) -> nn.Module:
    """FP8 first (compile then fuses the casts), then compile."""
    if fp8:
        convert_fp8(model)
    if compile:
        compile_blocks(model)
    return model
