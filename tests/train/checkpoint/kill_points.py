"""`python -m tests.train.checkpoint.kill_points RUN_ROOT N1,N2,...|auto|list OVERRIDES...`: kill -9 a pretraining run
before the N-th file operation of its checkpoint saves, for each N in turn, resume it, and print one JSON line per
kill point. First it runs the job uninterrupted, listing its file operations (printed as {"ops": [...]}); `auto`
kills before the first save's rename and before every operation of the last save; `list` only lists.

The imports (torch, DeepSpeed, Hydra: most of a launch's start-up time) happen once here; every run is a forked child
process (a 1-rank gloo job of its own), killed for real by `debug.kill_during_save_at` (SIGKILL) and resumed by a fresh
child, so many kill points cost seconds each.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir

from data_pipeline.cli import to_object_strict
from tests.helpers import REPO, losses
from train.checkpoint.layout import TMP_PREFIX, latest_tag
from train.pretrain import run


def child(overrides: list[str], log: Path) -> int:
    """Run `train.pretrain` in a forked process; returns its wait status (the signal that ended it, if one did)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        try:
            with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
                raw = compose("train", overrides=overrides)
            run(to_object_strict(raw), raw)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


def auto_points(ops: list[str]) -> list[int]:
    """The first save's rename to its tag, and every operation of the last save (1-based)."""
    last_start = ops.index("rename to latest") + 2  # the last save starts right after the first save's `latest`
    return [ops.index("rename to step_00000001") + 1, *range(last_start, len(ops) + 1)]


def main(root: Path, overrides: list[str], points: list[int] | None) -> None:
    # Imported once here, before any fork: otherwise every child pays for them (AdamW and DeepSpeed import torch's
    # compiler stack lazily, ~15 s of a 20 s child on a busy 2-core machine).
    import deepspeed.runtime.engine  # noqa: F401
    import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401
    import deepspeed.runtime.zero.stage_1_and_2  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    from train.trainer import build  # noqa: F401

    root.mkdir(parents=True, exist_ok=True)
    ref = root / "uninterrupted"
    os.environ["HANGANG_DEBUG_FILE_OPS"] = "1"  # the children print each file operation: the reference lists them
    never = "debug.kill_during_save_at=1000000"
    assert os.WIFEXITED(status := child([*overrides, f"run.dir={ref}", never], root / "ref.log")), status
    assert os.WEXITSTATUS(status) == 0, (root / "ref.log").read_text()[-3000:]
    prefix = "[debug] file operation "
    ops = [line.split(": ", 1)[1] for line in (root / "ref.log").read_text().splitlines() if line.startswith(prefix)]
    print(json.dumps({"ops": ops}), flush=True)
    if points == []:  # `list`: the operations only
        return
    points = auto_points(ops) if points is None else points
    for n in points:
        run_dir = root / f"kill{n:02d}"
        log = root / f"kill{n:02d}.log"
        status = child([*overrides, f"run.dir={run_dir}", f"debug.kill_during_save_at={n}"], log)
        if os.WIFEXITED(status):  # the run's saves have fewer than n file operations
            print(json.dumps({"kill_at": n, "signal": None, "exit": os.WEXITSTATUS(status)}), flush=True)
            continue
        ckpt_dir = run_dir / "checkpoints"
        what = [line for line in log.read_text().splitlines() if line.startswith("[debug] kill -9")]
        resume_from = latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        resumed = child([*overrides, f"run.dir={run_dir}"], log)
        ok = os.WIFEXITED(resumed) and os.WEXITSTATUS(resumed) == 0
        row = {
            "kill_at": n,
            "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
            "killed_before": what[0].split("(", 1)[-1].rstrip(")") if what else None,
            "resume_from": resume_from,
            "resumed_ok": ok,
            "resumed_line": resume_from is not None and f"resumed from {ckpt_dir / resume_from}" in log.read_text(),
            "losses_equal": ok and losses(run_dir) == losses(ref),
            "final_latest": latest_tag(ckpt_dir),
            "left_over": sorted(p.name for p in ckpt_dir.iterdir() if p.name.startswith(TMP_PREFIX)),
        }
        print(json.dumps(row), flush=True)
        if not row["resumed_ok"]:
            print(log.read_text()[-3000:], file=sys.stderr)


if __name__ == "__main__":
    which = sys.argv[2]
    named = {"auto": None, "list": []}
    main(Path(sys.argv[1]), sys.argv[3:], named[which] if which in named else [int(n) for n in which.split(",")])
