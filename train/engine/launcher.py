"""torchrun, made to start and stop well: `python -m launch.run [torchrun args] -m train.pretrain ...`.

Launcher side (`main`), torch 2.13's torch.distributed.run with three changes:
- SIGINT, SIGTERM and SIGUSR1 are forwarded to the workers, which finish their step, save and exit 0; the agent then
  sees a successful job and exits 0. Plain torchrun instead turns the signal into `SignalException`, forwards it, and
  exits 1 with a traceback whatever the workers did. A second such signal stops the workers at once (SIGKILL).
- Workers that all exit with USER_ERROR (2, a bad config: see data_pipeline.cli) are not restarted by
  `--max-restarts` and the launcher exits 2 without torchrun's ChildFailedError report (rank 0 printed the line).
  Nor are workers restarted after a forwarded stop signal.
- HANGANG_LAUNCHER_PID tells the workers which process to follow (`follow_launcher`).

Worker side (`follow_launcher`): torchrun starts each worker in its own session, so killing torchrun's process group
(kill -9) used to leave the workers training on. Each worker asks the kernel for SIGKILL when its parent dies
(prctl PR_SET_PDEATHSIG, Linux) and polls its parent pid once a second as a fallback (other systems; a parent that
died before the prctl).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time

USER_ERROR = 2
"""Exit status of a user error (mirrors data_pipeline.cli.USER_ERROR, which this layer cannot import)."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
"""Forwarded to the workers as a request to save and stop (their checkpoint.preemption_signals)."""
PR_SET_PDEATHSIG = 1


# --- worker side -----------------------------------------------------------------------------------------------


def follow_launcher() -> None:
    """Under torchrun: end this process (SIGKILL) as soon as its launcher dies, whatever killed the launcher."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return  # plain `python -m ...`: the shell is the parent
    parent = int(os.environ.get("HANGANG_LAUNCHER_PID", os.getppid()))
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the poll below still works
    if os.getppid() != parent:
        os._exit(1)  # the launcher died before the prctl took effect

    def poll() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                print(f"[launch] the launcher (pid {parent}) is gone: stopping", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=poll, name="follow-launcher", daemon=True).start()


# --- launcher side ---------------------------------------------------------------------------------------------


def _children() -> list[int]:
    """Pids of this process's direct children: torchrun's workers (each in its own session)."""
    me, out = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                out.append(int(entry))
    return out


class _Stopper:
    """Signal handlers of the launcher: forward a stop request once, kill on the second."""

    def __init__(self) -> None:
        self.requested: signal.Signals | None = None

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum, frame) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        sig = signal.Signals(signum)
        workers = _children()
        if self.requested is None and workers:
            self.requested = sig
            print(f"[launch] {sig.name}: the workers save after their current step and exit "
                  f"(send it again to stop them now)", file=sys.stderr, flush=True)  # fmt: skip
            for pid in workers:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            return
        for pid in workers:  # a second request, or no worker running yet: stop at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise SignalException(f"{sig.name}", sigval=sig)


def _user_error(failures: dict) -> bool:
    """A worker exited with USER_ERROR and every other failure is a worker the agent then stopped (by a signal)."""
    codes = {f.exitcode for f in failures.values()}
    return USER_ERROR in codes and all(c == USER_ERROR or c < 0 for c in codes)


class _QuietUserError(logging.Filter):
    """Drops the agent's `failed (exitcode: 2)` line and its lines about then stopping the other workers (logged
    just before it, while the failed worker's exit status is already known to its Popen)."""

    pcontext = None
    """The agent's process context (set by the patched monitor), whose handlers hold the workers' Popen objects."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if f"exitcode: {USER_ERROR})" in msg:
            return False
        if "closing signal" in msg:
            handlers = getattr(self.pcontext, "subprocess_handlers", {}) or {}
            return not any(getattr(h.proc, "returncode", None) == USER_ERROR for h in handlers.values())
        return True


def _patch_agent(stopper: _Stopper, quiet: _QuietUserError) -> None:
    """No restart (`--max-restarts`) for a user error or after a forwarded stop request: torch's agent restarts any
    failed worker group while restarts remain (LocalElasticAgent._invoke_run, torch 2.13)."""
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.agent.server.local_elastic_agent import LocalElasticAgent

    original = LocalElasticAgent._monitor_workers

    def monitor(self, worker_group):
        quiet.pcontext = getattr(self, "_pcontext", None)
        result = original(self, worker_group)
        if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
            if stopper.requested is not None or _user_error(result.failures):
                self._remaining_restarts = 0
        return result

    LocalElasticAgent._monitor_workers = monitor


def main(argv: list[str] | None = None) -> None:
    """`python -m launch.run` = `torchrun` (same arguments) with the changes in this module's docstring."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    # torch's own handlers (which raise SignalException and report a failure) only for the signals we do not forward.
    args.signals_to_handle = "SIGHUP,SIGQUIT"
    os.environ["HANGANG_LAUNCHER_PID"] = str(os.getpid())
    stopper = _Stopper()
    stopper.install()
    quiet = _QuietUserError()
    _patch_agent(stopper, quiet)

    @record
    def launch() -> None:
        try:
            torchrun.run(args)
        except ChildFailedError as err:
            if _user_error(err.failures):
                raise SystemExit(USER_ERROR) from None  # the worker said it in one line; no report, no retry
            raise

    # The agent logs a worker's exit and the stopping of the others; a user error has been said once already. (A
    # filter acts on the logger it is added to only, not on its children: add it to each of torch's elastic ones.)
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).addFilter(quiet)
    try:
        launch()
    except SignalException as err:
        print(f"[launch] stopped by {err.sigval.name}: the steps since the last checkpoint are lost",
              file=sys.stderr)  # fmt: skip
        sys.exit(128 + int(err.sigval))
