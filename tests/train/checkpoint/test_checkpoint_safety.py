"""Crash-safe checkpoints: kill -9 at many points of a save, damaged checkpoints, retention, untrusted pickles, and
secrets kept out of saved configs and logs. Every run is a real process; the kills are real SIGKILLs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO, losses, run_module, torchrun_pretrain, train_args
from train import checkpoint
from train.checkpoint import layout
from train.engine.deepspeed_compat import weights_only_loading
from train.secrets import REDACTED, redact

# A 1-rank ZeRO-2 run saving after steps 1 and 2 (one micro-batch per step, no evaluation): the cheapest run whose
# save holds every kind of file (full weights, meta, BOM, RNG, DeepSpeed model and optimizer states).
ONE_RANK = [
    "deepspeed.zero_stage=2",
    "train.max_steps=2",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=1",
    "train.global_batch_tokens=128",
    "train.eval_every=0",
]


@pytest.mark.slow
def test_kill_9_at_every_file_operation_of_a_save_resumes_exactly(tiny_tokenizer, tiny_data, tmp_path):
    # Rank 0's file operations, listed by an uninterrupted run: the save at step 1, then the one at step 2 (which also
    # deletes the first, keep_last=1). Kill points: every operation of the second save, and the first save's rename
    # (a complete temporary directory, with its manifest, that never got its name). Counted, not hard-coded, so a
    # checkpoint that gains a file moves the points instead of breaking the test.
    args = train_args(tiny_tokenizer, tiny_data, tmp_path / "unused", *ONE_RANK)
    proc = run_module("tests.train.checkpoint.kill_points", str(tmp_path), "auto", *args, timeout=900)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    ops, rows = lines[0]["ops"], lines[1:]
    first_latest = ops.index("rename to latest") + 1
    last_latest = len(ops) - ops[::-1].index("rename to latest")
    points = [ops.index("rename to step_00000001") + 1, *range(first_latest + 1, len(ops) + 1)]
    assert [r["kill_at"] for r in rows] == points
    for row in rows:
        # `latest` moves at the first save's and at the second save's rename: a kill before it resumes from the save
        # before.
        kill_at = row["kill_at"]
        expected = None if kill_at <= first_latest else "step_00000001" if kill_at <= last_latest else "step_00000002"
        assert row["signal"] == signal.SIGKILL, row
        assert row["resume_from"] == expected, row
        assert row["resumed_ok"] and row["losses_equal"], row  # same losses as the uninterrupted run, every step
        assert row["resumed_line"] == (expected is not None), row
        assert row["final_latest"] == "step_00000002" and row["left_over"] == [], row
    killed_before = [r["killed_before"] for r in rows]
    assert killed_before == [ops[n - 1] for n in points]
    # Every kind of file, in this order (a new kind of file may come in between).
    required = [
        "rename to step_00000001",
        "mkdir .tmp-step_00000002",
        "model.safetensors",
        "meta.json",
        "bom.json",
        "rng_rank0.pt",
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "manifest.json",
        "rename to step_00000002",
        "latest.tmp",
        "rename to latest",
        "remove step_00000001",
    ]
    it = iter(killed_before)
    assert all(name in it for name in required), killed_before
    assert killed_before[-4:] == required[-4:]  # the commit comes last: rename, pointer, retention


@pytest.mark.slow
def test_kill_9_of_a_two_process_job_during_a_save_resumes_exactly(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "killed"
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2")
    # Rank 0's file operations of one save, listed by a 1-rank run; in this job the second save (step 10) follows a
    # first of the same length. Kill just before rank 0 writes its optimizer shard of the second save, while rank 1
    # writes its own: the whole job (agent and both ranks) dies mid-save.
    listing = train_args(tiny_tokenizer, tiny_data, tmp_path / "unused", *ONE_RANK)
    out = run_module("tests.train.checkpoint.kill_points", str(tmp_path / "list"), "list", *listing).stdout
    ops = next(json.loads(line) for line in out.splitlines() if line.startswith('{"ops"'))["ops"]
    first_save = ops.index("rename to latest") + 1
    n = first_save + ops.index("zero_pp_rank_0_mp_rank_00_optim_states.pt") + 1
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    pipe = subprocess.PIPE
    kill = [f"debug.kill_during_save_at={n}"]
    proc = subprocess.Popen(cmd + args + kill, cwd=REPO, env=env, stdout=pipe, stderr=pipe)
    _, stderr = proc.communicate(timeout=300)  # returns only once no rank is left holding the pipes
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    assert f"kill -9 before file operation {n} of this launch's saves (zero_pp_rank_0".encode() in stderr
    ckpt_dir = run_dir / "checkpoints"
    assert (ckpt_dir / ".tmp-step_00000010").is_dir() and not (ckpt_dir / "step_00000010").exists()
    assert checkpoint.latest_tag(ckpt_dir) == "step_00000005"
    resumed = torchrun_pretrain(*args)  # the same command resumes from step 5
    assert f"resumed from {ckpt_dir / 'step_00000005'}" in resumed.stderr
    assert losses(run_dir) == losses(trained_run)
    assert not list(ckpt_dir.glob(".tmp-*")) and checkpoint.latest_tag(ckpt_dir) == "step_00000010"


@pytest.fixture
def two_checkpoints(trained_run, tmp_path) -> Path:
    """A copy of the session's run directory: checkpoints at steps 5 and 10, `latest` naming step 10."""
    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns("wandb"))
    return run_dir


@pytest.mark.slow
def test_a_damaged_or_unfinished_checkpoint_is_skipped_with_a_warning(two_checkpoints, capsys):
    ckpt_dir = two_checkpoints / "checkpoints"
    assert checkpoint.latest_tag(ckpt_dir) == "step_00000010"
    optim = ckpt_dir / "step_00000010" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(optim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the sha256 sees it
    optim.write_bytes(bytes(data))
    assert checkpoint.latest_tag(ckpt_dir, verify_hashes=False) == "step_00000010"
    assert checkpoint.latest_tag(ckpt_dir) == "step_00000005"
    assert "ignoring checkpoint" in capsys.readouterr().err
    optim.write_bytes(bytes(data[:1000]))  # truncated: a size check is enough
    assert checkpoint.latest_tag(ckpt_dir, verify_hashes=False) == "step_00000005"
    (ckpt_dir / "step_00000005" / layout.CKPT_MANIFEST).unlink()  # as a save interrupted before its manifest
    assert checkpoint.latest_tag(ckpt_dir) is None
    err = capsys.readouterr().err
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt has 1000 bytes" in err and "no manifest.json" in err


def test_retention_keeps_the_last_k_every_mth_and_latest(tmp_path):
    for step in range(1, 13):
        (tmp_path / checkpoint.tag_for(step)).mkdir()
    (tmp_path / "latest").write_text("step_00000002")  # e.g. a run that resumed from step 2 before saving step 12
    victims = checkpoint.retention_victims(tmp_path, 12, keep_last=3, keep_every=5)
    kept = {checkpoint.step_of(t) for t in layout._tags(tmp_path)} - {checkpoint.step_of(v) for v in victims}
    assert kept == {2, 5, 10, 11, 12}
    assert checkpoint.retention_victims(tmp_path, 12, keep_last=0, keep_every=5) == []  # 0 keeps everything
    # Tags past the step being saved (an abandoned history) are neither counted nor deleted.
    assert checkpoint.step_of(max(checkpoint.retention_victims(tmp_path, 6, keep_last=2, keep_every=0))) == 4


@pytest.fixture(scope="module")
def single_rank_run(tiny_tokenizer, tiny_data, tmp_path_factory):
    """A 1-process run of 6 steps saving every step (keep_last=2, keep_every=3), offline W&B, with secrets in the
    environment and one interpolated into a config value; returns (run_dir, the process)."""
    run_dir = tmp_path_factory.mktemp("retention") / "run"
    extra = [
        "deepspeed.zero_stage=0",
        "train.max_steps=6",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "checkpoint.keep_every=3",
        "train.global_batch_tokens=128",
        "train.eval_every=0",
        "logging.wandb.mode=offline",
        "logging.wandb.name=run-${oc.env:WANDB_API_KEY}",
    ]
    env = {"WANDB_API_KEY": SECRET, "HF_TOKEN": SECRET[::-1]}
    proc = run_module("train.pretrain", *train_args(tiny_tokenizer, tiny_data, run_dir, *extra), env=env)
    return run_dir, proc


SECRET = "wandb-0123456789abcdef-secret"


@pytest.mark.slow
def test_retention_in_a_real_run(single_rank_run):
    run_dir, _ = single_rank_run
    ckpt_dir = run_dir / "checkpoints"
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir())
    assert tags == ["step_00000003", "step_00000005", "step_00000006"]
    assert checkpoint.pointer_tag(ckpt_dir) == "step_00000006" and checkpoint.latest_tag(ckpt_dir) == "step_00000006"


@pytest.mark.slow
def test_secrets_never_reach_saved_configs_or_logs(single_rank_run):
    run_dir, proc = single_rank_run
    assert list((run_dir / "wandb").glob("offline-run-*")), "the offline W&B run exists"
    for secret in (SECRET, SECRET[::-1]):
        assert secret not in proc.stdout + proc.stderr
        for path in run_dir.rglob("*"):
            assert not path.is_file() or secret.encode() not in path.read_bytes(), path
    assert f"name: run-{REDACTED}" in (run_dir / "config.yaml").read_text()
    raw = {"logging": {"wandb": {"api_key": "k-123", "name": f"x{SECRET}"}}, "hf_token": "t", "db.password": 5}
    raw["train"] = {"global_batch_tokens": 8192, "tokenizer": "ko8k", "key": None}
    assert redact(raw, [SECRET]) == {
        "logging": {"wandb": {"api_key": REDACTED, "name": f"x{REDACTED}"}},
        "hf_token": REDACTED,
        "db.password": REDACTED,
        "train": {"global_batch_tokens": 8192, "tokenizer": "ko8k", "key": None},
    }


class _Planted:
    """Unpickling this runs `touch MARKER`: what an attacker would hide in a checkpoint file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(tag_dir: Path, name: str, marker: Path) -> None:
    """Replace one file by a malicious pickle and update the manifest (an attacker can rewrite it too)."""
    torch.save({"optimizer_state_dict": _Planted(marker)}, tag_dir / name)
    manifest = json.loads((tag_dir / layout.CKPT_MANIFEST).read_text())
    manifest["files"][name] = layout.sha256_of(tag_dir / name)
    (tag_dir / layout.CKPT_MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.slow
def test_an_untrusted_pickle_is_refused_not_executed(two_checkpoints, tiny_tokenizer, tiny_data, tmp_path):
    marker = tmp_path / "pwned"
    tag_dir = two_checkpoints / "checkpoints" / "step_00000010"
    _plant(tag_dir, "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    # DeepSpeed's own loaders pass weights_only=False; inside safe_loading they are refused all the same.
    with pytest.raises(ValueError, match="refused to load checkpoint .*needs arbitrary code to unpickle"):
        with weights_only_loading(tag_dir):
            torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)
    assert not marker.exists()
    # A real resume (1 rank: the checkpoint first goes through DeepSpeed's universal conversion) refuses it too.
    args = train_args(tiny_tokenizer, tiny_data, two_checkpoints, "deepspeed.zero_stage=2", "train.max_steps=12")
    proc = run_module("train.pretrain", *args, check=False)
    assert proc.returncode == 2 and "error: refused to load checkpoint" in proc.stderr, proc.stderr[-3000:]
    assert str(tag_dir) in proc.stderr and not marker.exists()
