"""Faults a run survives, each injected through the `debug` config group into real 2-process torchrun jobs (CPU, gloo):
non-finite losses and gradients, loss spikes with rollback, a killed rank under `--max-restarts`, a stalled rank."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from tests.helpers import losses, run_module, torchrun_pretrain, train_args
from train.callbacks.stability import NumericGuard


def rows(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_guard_flags_nonfinite_and_robust_spikes_only():
    guard = NumericGuard(window=4, z_threshold=6.0, max_consecutive=2)
    for i, loss in enumerate([5.0, 4.9, 4.8, 4.85]):
        assert guard.verdict(loss) is None  # the window is not full yet, or the loss is ordinary
        guard.record(None, loss, i)
    assert guard.verdict(math.nan) == guard.verdict(math.inf) == "nonfinite"
    assert guard.verdict(4.9) is None and guard.verdict(4.0) is None  # a drop is never a spike
    assert guard.verdict(5.5) == "spike"  # median 4.875, MAD 0.05: z = 8.4
    guard.record("spike", 5.5, 40)
    assert not guard.rollback_due
    guard.record("spike", 50.0, 48)
    assert guard.rollback_due and guard.bad_positions == [40, 48] and guard.recent == [5.0, 4.9, 4.8, 4.85]
    copy = NumericGuard(window=4, z_threshold=6.0, max_consecutive=2)
    copy.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert copy.state_dict() == guard.state_dict()


def test_bad_fault_settings_are_refused():
    from train.config import DebugConfig, SpikeConfig

    with pytest.raises(ValueError, match="train.spike.window=2"):
        SpikeConfig(window=2)
    with pytest.raises(ValueError, match="max_consecutive"):
        SpikeConfig(max_consecutive=0)
    with pytest.raises(ValueError, match=r"debug.kill_rank_at_step=\[7\]: give \[rank, step\]"):
        DebugConfig(kill_rank_at_step=[7])


@pytest.mark.slow
def test_nan_loss_and_inf_grad_skip_the_update(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    """ZeRO-0 (plain torch AdamW under DeepSpeed, where our gate must do the skipping): a NaN loss at step 3 and an
    infinite gradient on one rank at step 6 skip those updates; the run goes on with finite losses and weights."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "nan"
    faults = ["debug.nan_loss_at_steps=[3]", "debug.inf_grad_at_steps=[6]"]
    proc = torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=0", *faults))
    by_step = {r["step"]: r for r in rows(run_dir) if "loss" in r}
    assert by_step[3].get("skipped") == "nonfinite" and math.isnan(by_step[3]["loss"])
    assert by_step[6].get("skipped") == "nonfinite" and math.isfinite(by_step[6]["loss"])  # finite loss, inf grads
    assert [s for s, r in by_step.items() if "skipped" in r] == [3, 6]
    assert by_step[10]["skipped_nonfinite"] == 2
    assert all(math.isfinite(by_step[s]["loss"]) for s in by_step if s not in (3,))
    assert "[faults] step 3: nonfinite" in proc.stderr and "[faults] step 6: nonfinite" in proc.stderr
    # Untouched before the fault, and the schedule moves on: step 4 has the learning rate of an uninterrupted run.
    clean = {r["step"]: r for r in rows(trained_run) if "loss" in r}
    assert [by_step[s]["loss"] for s in (1, 2)] == pytest.approx([clean[s]["loss"] for s in (1, 2)], rel=1e-5)
    assert by_step[4]["lr"] == clean[4]["lr"]
    tag = run_dir / "checkpoints" / "step_00000010"
    assert all(bool(w.isfinite().all()) for w in load_file(str(tag / "model.safetensors")).values())
    # No optimizer update at the skipped steps: AdamW took 8 steps in 10, while the LR schedule took all 10.
    states = torch.load(tag / "mp_rank_00_model_states.pt", weights_only=True, map_location="cpu")
    assert {float(s["step"]) for s in states["optimizer"]["state"].values()} == {8.0}
    assert states["lr_scheduler"]["last_epoch"] == 10


@pytest.mark.slow
def test_spikes_are_skipped_then_rolled_back_past_the_bad_batches(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    """ZeRO-2: a NaN loss at step 3 (skipped by DeepSpeed's own overflow check), then the batches of steps 7 and 8
    spike (x10); both updates are skipped, the run rolls back to the step-5 checkpoint, replays step 6 exactly, and
    trains on past the two bad batches to step 10. The LR schedule matches an uninterrupted run's throughout."""
    run_dir = tmp_path / "spike"
    faults = ["train.spike.window=3", "train.spike.max_consecutive=2", "debug.spike_at_steps=[7,8]",
              "debug.nan_loss_at_steps=[3]"]  # fmt: skip
    proc = torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", *faults))
    log = rows(run_dir)
    (rollback,) = [r for r in log if "rollback_from" in r]
    assert rollback["rollback_from"] == 8 and rollback["skipped_spike"] == 2 and rollback["rollbacks"] == 1
    assert "rolled back to step_00000005" in proc.stderr
    before = {r["step"]: r for r in log[: log.index(rollback)] if "loss" in r}
    assert {s: r["skipped"] for s, r in before.items() if "skipped" in r} == {3: "nonfinite", 7: "spike", 8: "spike"}
    after = {r["step"]: r for r in log[log.index(rollback) :] if "loss" in r}
    assert sorted(after) == [6, 7, 8, 9, 10] and not any("skipped" in r for r in after.values())
    assert after[6]["loss"] == before[6]["loss"]  # replayed from the checkpoint: the same step, bit for bit
    assert all(after[s]["loss"] < 1.1 * before[6]["loss"] for s in (7, 8, 9, 10))
    assert after[10]["tokens"] == 12 * 512  # two global batches (512 tokens each) were stepped over
    assert (after[10]["skipped_nonfinite"], after[10]["skipped_spike"], after[10]["rollbacks"]) == (1, 2, 1)
    clean = {r["step"]: r["lr"] for r in rows(trained_run) if "lr" in r}
    assert all(r["lr"] == clean[r["step"]] for r in log if "lr" in r)


@pytest.mark.slow
def test_killed_rank_restarts_and_resumes_exactly(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    """Rank 1 is SIGKILLed after step 7; torchrun restarts the job, which resumes from the step-5 checkpoint by
    itself and ends with the losses of an uninterrupted run."""
    run_dir = tmp_path / "killed"
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "debug.kill_rank_at_step=[1,7]")
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "--max-restarts=1", "-m", "train.pretrain", *args]
    proc = run_module(*cmd)
    assert "rank 1 SIGKILLs itself after step 7" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000005" in proc.stderr
    assert losses(run_dir) == losses(trained_run)


@pytest.mark.slow
def test_stalled_rank_is_named_and_ends_the_job(tiny_tokenizer, tiny_data, tmp_path):
    """Rank 1 hangs before step 3: within the collective timeout the job exits non-zero, naming rank 1."""
    run_dir = tmp_path / "stalled"
    stall = ["debug.stall_rank_at_step=[1,3]", "deepspeed.timeout_minutes=0.25"]
    start = time.monotonic()
    proc = torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, *stall), check=False)
    took = time.monotonic() - start
    assert proc.returncode != 0
    hang = [line for line in proc.stderr.splitlines() if line.startswith("[hang]")]
    assert hang and hang[0].startswith("[hang] rank 1 did not reach step 3 within 15 s"), proc.stderr[-3000:]
    assert took < 120
