"""Where prepare's tasks run: `data.engine=local` (a process pool on this machine) or `ray` (Ray tasks).

Both only map a module-level function over a list of task arguments and return the results in order; the stages,
their order and their outputs are prepare's (prepare.py). Every task writes its outputs atomically and skips work
that is already done, so a task run twice (a retry after a killed worker, or a relaunch of the same command) gives
the same bytes. Ray retries a task whose worker died (`max_retries`); the local pool is restarted for the unfinished
tasks (`RETRIES` times), and a relaunch reuses every finished result.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

RETRIES = 3
REPO = Path(__file__).resolve().parents[1]

_CTX: dict = {}


def _init(ctx) -> None:
    _CTX["ctx"] = ctx


def _call(fn, arg):
    return fn(_CTX["ctx"], arg)


class LocalEngine:
    """A process pool of `workers` processes (inline when 1); the context travels once per process."""

    def __init__(self, workers: int) -> None:
        self.workers = workers

    def map(self, fn, args: list, ctx, *, log=print, name: str = "") -> list:
        if not args:
            return []
        if self.workers <= 1 or len(args) == 1:
            return [fn(ctx, a) for a in args]
        results: dict[int, object] = {}
        mp = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
        for attempt in range(RETRIES + 1):
            todo = [i for i in range(len(args)) if i not in results]
            try:
                workers = min(self.workers, len(todo))
                with ProcessPoolExecutor(workers, mp_context=mp, initializer=_init, initargs=(ctx,)) as pool:
                    futures = {i: pool.submit(_call, fn, args[i]) for i in todo}
                    for i, f in futures.items():
                        results[i] = f.result()
                break
            except BrokenProcessPool:
                if attempt == RETRIES:
                    raise
                left = len(args) - len(results)
                log(f"[prepare] a worker of stage {name} died; retrying its {left} unfinished tasks")
        return [results[i] for i in range(len(args))]

    def close(self) -> None:
        pass


class RayEngine:
    """Ray tasks on the cluster at `address` (None: a local one started here, stopped by close())."""

    def __init__(self, address: str | None, workers: int) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        try:
            import ray
        except ImportError as err:
            raise ImportError("data.engine=ray needs Ray: pip install 'ray>=2.9' (or use data.engine=local)") from err
        self.ray = ray
        # Workers import data_pipeline from this checkout (a shared filesystem on a cluster), not an installed copy.
        env = {"env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}}
        self.owned = not ray.is_initialized()
        if self.owned:
            kwargs = {"include_dashboard": False, "log_to_driver": True, "runtime_env": env}
            if address:
                ray.init(address=address, **kwargs)
            else:
                kwargs.update(num_cpus=workers or os.cpu_count() or 1, object_store_memory=100 << 20)
                for attempt in range(3):
                    try:
                        ray.init(**kwargs)
                        break
                    except Exception as err:  # Ray gives a starting raylet 30 s, too few on an overloaded machine
                        if "timed out during startup" not in str(err) or attempt == 2:
                            raise
                        ray.shutdown()
        self.remote = {}

    def map(self, fn, args: list, ctx, *, log=print, name: str = "") -> list:
        if not args:
            return []
        ray = self.ray
        if fn not in self.remote:
            self.remote[fn] = ray.remote(num_cpus=1, max_retries=RETRIES, retry_exceptions=False)(fn)
        ref = ray.put(ctx)
        return ray.get([self.remote[fn].remote(ref, a) for a in args])

    def close(self) -> None:
        if self.owned:
            self.ray.shutdown()


def make_engine(engine: str, address: str | None, workers: int):
    """The executor of `data.engine`."""
    if engine == "ray":
        return RayEngine(address, workers)
    return LocalEngine(workers)
