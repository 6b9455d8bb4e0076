"""One run per run directory: RUN_DIR/run.lock, held by rank 0 from the plan until the end of the launch.

Works on the shared filesystems clusters use (NFS, Lustre), where `flock` is often missing or local to a node: the
lock file is created with O_CREAT|O_EXCL (atomic on NFSv3+ and Lustre) and records host, pid, launcher pid and job
id; its heartbeat is the file's modification time, which a daemon thread of the holder sets to the time now (utime:
never a rewrite, so a holder that wakes up late cannot overwrite the record of a run that took over). A holder is
gone, and its lock is taken over with a message, when its heartbeat is older than `stale_s`, or when it ran on this
host and its process no longer exists. A restart of the same job (torchrun `--max-restarts`: same launcher; SLURM:
same job id, also after a requeue) takes its own lock back. A takeover is serialised by a second O_EXCL file, so two
launchers that find the same stale lock cannot both win.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

LOCK_NAME = "run.lock"
TAKEOVER_SUFFIX = ".takeover"
TAKEOVER_STALE_S = 60.0
"""A takeover file older than this was left by a launcher that died while taking over: it is removed."""


class RunDirBusy(ValueError):
    """run.dir is held by another live run (a user error: exit status 2, one line)."""


def _pid_alive(pid: int) -> bool:
    """True when `pid` exists on this host and is not a zombie (a killed, not yet reaped worker is gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def identity() -> dict:
    """Who is asking: this process, its launcher (torchrun's agent, when under torchrun) and its job."""
    under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "launcher_pid": int(os.environ.get("HANGANG_LAUNCHER_PID", os.getppid())) if under_torchrun else None,
        "torchrun_id": os.environ.get("TORCHELASTIC_RUN_ID"),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def describe(holder: dict, now: float | None = None) -> str:
    age = (now or time.time()) - float(holder.get("heartbeat", 0))  # read by _read from the file's mtime
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')}, pid {holder.get('pid')}{job}, heartbeat {age:.0f} s ago"


class RunLock:
    """`acquire()` or raise RunDirBusy naming the holder; `release()` at the end (only our own lock is removed)."""

    def __init__(self, run_dir: str | Path, stale_s: float = 300.0, log=None) -> None:
        self.dir = Path(run_dir)
        self.path = self.dir / LOCK_NAME
        self.stale_s = stale_s
        self.interval = min(30.0, stale_s / 10)
        self.me = {**identity(), "token": uuid.uuid4().hex}
        self.log = log or (lambda m: print(f"[run] {m}", file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    # --- decisions ---------------------------------------------------------------------------------------------

    def same_job(self, holder: dict) -> bool:
        """The holder is an earlier attempt of this very job, which may take its lock back."""
        me = self.me
        if me["slurm_job_id"] and holder.get("slurm_job_id") == me["slurm_job_id"]:
            return True  # SLURM runs one job id once at a time (a requeue is the same job)
        return bool(
            me["launcher_pid"]
            and holder.get("host") == me["host"]
            and holder.get("launcher_pid") == me["launcher_pid"]
            and holder.get("torchrun_id") == me["torchrun_id"]
            and _pid_alive(me["launcher_pid"])
        )

    def gone(self, holder: dict) -> str | None:
        """Why the holder is no longer running, or None when it may be."""
        age = time.time() - float(holder.get("heartbeat", 0))
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (run.lock_stale_s={self.stale_s:g})"
        if holder.get("host") == self.me["host"] and isinstance(holder.get("pid"), int):
            if not _pid_alive(holder["pid"]):
                return f"its process {holder['pid']} on this host has exited"
        return None

    # --- file operations ---------------------------------------------------------------------------------------

    def _record(self) -> str:
        return json.dumps({**self.me, "started": time.time(), "stale_s": self.stale_s}) + "\n"

    def _replace(self) -> None:
        """Write our record atomically over whatever is there (rename; same directory, so same filesystem)."""
        tmp = self.dir / f".{LOCK_NAME}.{self.me['token']}"
        with open(tmp, "w") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _read(self) -> tuple[str, dict] | None:
        """The lock's text and record, `heartbeat` = its mtime; None when there is none. A torn record (a crash
        mid-write) reads as a holder with no heartbeat: stale."""
        try:
            raw = self.path.read_text()
            beat = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            rec = {**json.loads(raw), "heartbeat": beat}
        except json.JSONDecodeError:
            rec = {"host": "?", "pid": "?", "heartbeat": 0}
        return raw, rec

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _take_over(self, seen: str) -> bool:
        """Replace the lock if it still reads `seen`; serialised by an O_EXCL takeover file. False = lost a race."""
        mutex = self.path.with_name(LOCK_NAME + TAKEOVER_SUFFIX)
        try:
            fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - mutex.stat().st_mtime > TAKEOVER_STALE_S:
                    mutex.unlink()  # left by a launcher that died mid-takeover
            except FileNotFoundError:
                pass
            return False
        try:
            os.write(fd, self.me["token"].encode())
            os.close(fd)
            current = self._read()
            if current is None or current[0] != seen:
                return False  # released or taken meanwhile: start over
            self._replace()
            return True
        finally:
            mutex.unlink(missing_ok=True)

    # --- public ------------------------------------------------------------------------------------------------

    def acquire(self, attempts: int = 50) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        for _ in range(attempts):
            if self._create():
                return self._start()
            current = self._read()
            if current is None:
                continue  # released between our create and our read
            raw, holder = current
            if self.same_job(holder):
                if self._take_over(raw):
                    self.log(f"took back this job's lock on {self.path} (a restart of the same job)")
                    return self._start()
            elif (why := self.gone(holder)) is not None:
                if self._take_over(raw):
                    self.log(f"took over {self.path} from a run that is gone ({describe(holder)}): {why}")
                    return self._start()
            else:
                raise RunDirBusy(
                    f"run.dir={self.dir} is in use by another run ({describe(holder)}; {self.path}): wait for it "
                    f"to end or choose another run.dir (a holder silent for run.lock_stale_s={self.stale_s:g} s "
                    "is taken over)"
                )
            time.sleep(0.1)  # another launcher is taking over: look again
        raise RunDirBusy(f"run.dir={self.dir}: could not take {self.path} (other launchers keep taking it)")

    def _start(self) -> None:
        self.held = True
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                current = self._read()
                if current is None or current[1].get("token") != self.me["token"]:
                    who = "removed" if current is None else f"taken by {describe(current[1])}"
                    self.log(f"{self.path} was {who}: no longer refreshing it")
                    self.held = False
                    return
                now = time.time()
                os.utime(self.path, (now, now))  # at worst refreshes a run that just took over: harmless
            except OSError as err:  # a storage hiccup must not kill training; the next beat tries again
                self.log(f"could not refresh {self.path}: {err}")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            current = self._read()
            if current is not None and current[1].get("token") == self.me["token"]:
                self.path.unlink(missing_ok=True)
            self.held = False
