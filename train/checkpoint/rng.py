"""Random-number-generator states of one rank (torch, numpy, python, accelerator), saved with every checkpoint."""

from __future__ import annotations

import random

import numpy as np
import torch

from model import accelerator


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    state.update(accelerator.rng_state() or {})
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    accelerator.set_rng_state(state)
