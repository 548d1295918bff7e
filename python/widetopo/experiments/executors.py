"""Where `compare` cells run when there is more than one at a time: a pool of worker processes on
this machine ("local", --workers N) or Ray tasks on a cluster ("ray", --executor ray).

Both are generators of events for the coordinator (experiments.compare.run), which alone writes
the journal:

    ("start", cell, where)       the cell was handed to a worker (where: "worker 0 on cpu", ...)
    ("phase", cell, name)        it entered a phase (prune, effective sparsity, train)
    ("done", cell, row)          its row (the worker has written its mask file, atomically)
    ("refused", cell, error)     its method refused it (one of compare.REFUSALS): journaled as failed
    ("retry", cell, error)       its worker died (killed, out of memory): the cell runs once more
    ("failed", cell, error)      its worker died on the retry as well: journaled as failed

Any other exception inside a worker (a bug, a RecipeError, a missing dataset) stops the run and
is raised in the coordinator, as in a run without workers. Every cell is deterministic (seeded
initialisation, pruning set and data order), so the rows equal those of a run without workers.
Local workers are forked on Linux before CUDA is initialised (they inherit the imports and the
data the coordinator loaded: no start-up of their own) and spawned elsewhere, where each loads
the data itself from the recipe's Setup; Ray tasks load it once per Ray worker process.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import multiprocessing
import multiprocessing.util
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import wait as wait_for
from typing import Dict, Iterator, List, Optional

import torch

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")

#: a cell whose worker dies is run this many times in all before it is journaled as failed
ATTEMPTS = 2

#: test hook: a worker that starts a cell whose label (e.g. "random d=0.2 s0") is in KILL_ENV
#: ("|"-separated) kills itself with SIGKILL, on every attempt; in KILL_ONCE_ENV, on its first
#: attempt only (so the retry succeeds).
KILL_ENV = "WIDETOPO_TEST_KILL_CELL"
KILL_ONCE_ENV = "WIDETOPO_TEST_KILL_ONCE"


def check_executor(workers, executor: str, address: Optional[str], threads_per_worker) -> None:
    """Validate the executor arguments before any work (ValueError/TypeError naming the argument)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be an integer >= 1, got {workers!r}")
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(map(repr, EXECUTORS))}, got {executor!r}")
    if address is not None and executor != "ray":
        raise ValueError(f"address is the address of a Ray cluster: it needs executor='ray', got executor={executor!r}")
    if threads_per_worker is not None and (isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int)
                                           or threads_per_worker < 1):
        raise ValueError(f"threads_per_worker must be an integer >= 1 or None, got {threads_per_worker!r}")
    if executor == "ray":
        import_ray()


def import_ray():
    try:
        import ray
    except ImportError:
        from widetopo.errors import CompareError
        raise CompareError("executor 'ray' needs Ray: pip install \"widetopo[ray]\"") from None
    return ray


def fork_workers() -> bool:
    """Fork the local workers (they inherit the imports and the loaded data: no ~2 s start per
    worker) where that is safe: on Linux, before CUDA is initialised in this process (a CUDA
    context does not survive fork). Elsewhere they are spawned. Each worker sets its own thread
    count before any torch work (torch resets its CPU thread pool in a forked child)."""
    return sys.platform.startswith("linux") and not torch.cuda.is_initialized()


def default_threads(workers: int) -> int:
    """An equal share of this machine's cores: max(1, cores // workers)."""
    return max(1, (os.cpu_count() or 1) // workers)


def worker_devices(device: str, workers: int) -> List[str]:
    """Device of each worker: round-robin over the visible GPUs when the recipe's device is
    "cuda" (no index); an explicit cuda:N or cpu is used by every worker."""
    if device == "cuda" and torch.cuda.is_available() and torch.cuda.device_count() > 0:
        count = torch.cuda.device_count()
        return [f"cuda:{i % count}" for i in range(workers)]
    return [device] * workers


def _kill_hook(cell, attempt: int) -> None:
    always = os.environ.get(KILL_ENV, "").split("|")
    once = os.environ.get(KILL_ONCE_ENV, "").split("|")
    if cell.label in always or (attempt == 1 and cell.label in once):
        os.kill(os.getpid(), signal.SIGKILL)


def _exit_reason(code) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _portable(exc: BaseException, tb: str) -> BaseException:
    """`exc` if it pickles, else a RuntimeError carrying its text and traceback."""
    import pickle
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}\n{tb}")


# ------------------------------------------------------------------------------ local pool

def _worker_main(conn, recipe, out_dir: str, options: dict, threads: int, data) -> None:
    """A pool worker: load the data once, then run the cells it is sent until it gets None."""
    from widetopo.experiments import compare
    from widetopo.experiments.recipe import load_datasets, quiet_loggers

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the coordinator stops us
    torch.set_num_threads(threads)
    logging.getLogger("widetopo").setLevel(logging.WARNING)
    cell = None
    try:
        if data is None:
            data = load_datasets(recipe.setup, augment=recipe.train.augment)
        conn.send(("ready", None, None))
        with quiet_loggers():
            while True:
                task = conn.recv()
                if task is None:
                    return
                cell, attempt = task
                _kill_hook(cell, attempt)
                try:
                    row = compare.run_cell(recipe, cell, data, out_dir, options,
                                           lambda name, key=cell.key: conn.send(("phase", key, name)))
                except compare.REFUSALS as exc:
                    conn.send(("refused", cell.key, f"{type(exc).__name__}: {exc}"))
                    continue
                conn.send(("done", cell.key, row))
                cell = None
    except (EOFError, BrokenPipeError):  # the coordinator is gone
        pass
    except BaseException as exc:  # noqa: BLE001 - reported to the coordinator, which stops the run
        try:
            conn.send(("error", None if cell is None else cell.key, (_portable(exc, traceback.format_exc()),
                                                                     traceback.format_exc())))
        except (EOFError, BrokenPipeError, OSError):
            pass
    finally:
        # Everything a worker leaves (mask files, messages) is written and closed by now; skipping
        # the interpreter's teardown (about 1 s with torch and the data loaded, measured) keeps
        # it off the end of the run.
        try:
            multiprocessing.util._exit_function()  # what multiprocessing runs at a worker's exit (semaphores)
        except Exception:  # noqa: BLE001 - best effort on the way out
            pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError, AttributeError):
                pass
        os._exit(0)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored in this process for the block (main thread only; elsewhere a no-op). A
    process started meanwhile inherits the ignored SIGINT, and Python then installs no
    KeyboardInterrupt handler in it: Ctrl-C, sent to the whole process group by a terminal,
    reaches the coordinator only, which stops the workers itself."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@dataclasses.dataclass
class _Slot:
    index: int
    proc: object
    conn: object
    ready: bool = False
    cell: object = None


def local_pool(recipe, cells: List, out_dir: str, options: dict, *, workers: int, threads: int,
               data=None) -> Iterator[tuple]:
    """Run `cells` in `workers` processes (forked or spawned: fork_workers; each with `threads` CPU threads and its device
    from worker_devices); yields the events of the module docstring. Closing the generator (an
    exception or KeyboardInterrupt in the coordinator) terminates every worker."""
    ctx = multiprocessing.get_context("fork" if fork_workers() else "spawn")
    devices = worker_devices(recipe.setup.device, workers)
    queue = collections.deque(cells)
    attempts: Dict[tuple, int] = collections.Counter()
    by_key = {c.key: c for c in cells}
    slots: Dict[int, _Slot] = {}

    def spawn(index: int) -> None:
        parent, child = ctx.Pipe()
        worker_recipe = dataclasses.replace(recipe, setup=dataclasses.replace(recipe.setup, device=devices[index]))
        proc = ctx.Process(target=_worker_main, name=f"widetopo-compare-worker-{index}", daemon=True,
                           args=(child, worker_recipe, out_dir, options, threads, data))
        with _sigint_ignored():  # inherited through exec: a Ctrl-C while it imports does not reach it either
            proc.start()
        child.close()  # so that the worker's death reads as EOF here
        slots[index] = _Slot(index, proc, parent)
        logger.debug("started worker %d (pid %d) on %s with %d thread(s)", index, proc.pid, devices[index], threads)

    def died(slot: _Slot):
        slot.proc.join(5)
        slot.conn.close()
        del slots[slot.index]
        reason = _exit_reason(slot.proc.exitcode)
        if not slot.ready:
            from widetopo.errors import CompareError
            raise CompareError(f"compare worker {slot.index} died while starting ({reason})")
        cell, event = slot.cell, None
        if cell is not None:
            message = f"WorkerDied: the worker process running this cell died ({reason})"
            if attempts[cell.key] < ATTEMPTS:
                queue.appendleft(cell)
                event = ("retry", cell, message)
            else:
                event = ("failed", cell, message)
        if queue:
            spawn(slot.index)  # a fresh worker in its place
        return event

    finished = False
    try:
        for index in range(min(workers, len(cells))):
            spawn(index)
        while queue or any(s.cell is not None for s in slots.values()):
            for slot in list(slots.values()):
                if slot.ready and slot.cell is None and queue:
                    cell = queue.popleft()
                    attempts[cell.key] += 1
                    slot.cell = cell
                    slot.conn.send((cell, attempts[cell.key]))
                    yield ("start", cell, f"worker {slot.index} on {devices[slot.index]}")
            if not slots:
                break
            ready = wait_for([s.conn for s in slots.values()])
            for slot in [s for s in list(slots.values()) if s.conn in ready]:
                try:
                    kind, key, payload = slot.conn.recv()
                except (EOFError, OSError):
                    event = died(slot)
                    if event is not None:
                        yield event
                    continue
                if kind == "ready":
                    slot.ready = True
                elif kind == "phase":
                    yield ("phase", by_key[key], payload)
                elif kind in ("done", "refused"):
                    slot.cell = None
                    yield (kind, by_key[key], payload)
                elif kind == "error":
                    exc, tb = payload
                    logger.debug("worker %d failed:\n%s", slot.index, tb)
                    raise exc
        finished = True
    finally:
        for slot in slots.values():
            if finished:
                try:
                    slot.conn.send(None)
                except (OSError, BrokenPipeError):
                    pass
            else:
                slot.proc.terminate()
        for slot in slots.values():
            slot.proc.join(10 if finished else 5)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join(5)
            slot.conn.close()


# ------------------------------------------------------------------------------ Ray

_RAY_DATA: dict = {}


def _ray_cell(recipe, cell, attempt: int, out_dir: str, options: dict, threads: int, use_gpu: bool, data):
    """One cell as a Ray task: ("done", row) or ("refused", error); other exceptions propagate
    (a RayTaskError in the coordinator, which stops the run). The data are loaded once per Ray
    worker process and kept for its next cells."""
    from widetopo.experiments import compare
    from widetopo.experiments.recipe import load_datasets, quiet_loggers

    torch.set_num_threads(threads)
    logging.getLogger("widetopo").setLevel(logging.WARNING)
    recipe = dataclasses.replace(recipe, setup=dataclasses.replace(recipe.setup, device="cuda" if use_gpu else "cpu"))
    if data is None:
        s = recipe.setup
        key = (s.dataset, s.data_dir, s.max_train_samples, s.max_test_samples, recipe.train.augment)
        if key not in _RAY_DATA:
            _RAY_DATA.clear()
            _RAY_DATA[key] = load_datasets(s, augment=recipe.train.augment)
        data = _RAY_DATA[key]
    _kill_hook(cell, attempt)
    with quiet_loggers():
        try:
            return ("done", compare.run_cell(recipe, cell, data, out_dir, options, lambda name: None))
        except compare.REFUSALS as exc:
            return ("refused", f"{type(exc).__name__}: {exc}")


def ray_tasks(recipe, cells: List, out_dir: str, options: dict, *, workers: int, threads: int,
              address: Optional[str] = None, data=None) -> Iterator[tuple]:
    """Run `cells` as Ray tasks, at most `workers` at a time, each with `threads` CPUs and one
    GPU when the cluster has GPUs. Uses the Ray connection of this process if there is one, else
    ray.init(address) (None: RAY_ADDRESS or a new local Ray), shut down again at the end. Same
    events and failure rules as local_pool (Ray's own retries are off: a crashed worker costs
    its cell one of its ATTEMPTS)."""
    ray = import_ray()
    # tasks run in other working directories (and on other machines): absolute paths only
    out_dir = os.path.abspath(out_dir)
    if recipe.setup.data_dir:
        recipe = dataclasses.replace(recipe, setup=dataclasses.replace(recipe.setup,
                                                                      data_dir=os.path.abspath(recipe.setup.data_dir)))
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    elif address is not None:
        logger.warning("Ray is already initialised in this process: address %s is ignored", address)
    pending: Dict[object, object] = {}
    try:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        task = ray.remote(_ray_cell).options(num_cpus=threads, num_gpus=1 if use_gpu else 0, max_retries=0)
        data_ref = ray.put(data) if data is not None else None
        queue = collections.deque(cells)
        attempts: Dict[tuple, int] = collections.Counter()
        while queue or pending:
            while queue and len(pending) < workers:
                cell = queue.popleft()
                attempts[cell.key] += 1
                pending[task.remote(recipe, cell, attempts[cell.key], out_dir, options, threads, use_gpu, data_ref)] = cell
                yield ("start", cell, "a Ray task" + (" with 1 GPU" if use_gpu else ""))
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ref)
            try:
                kind, payload = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:  # raised by our code in the task: stop, as without Ray
                cause = exc.as_instanceof_cause()
                raise (getattr(exc, "cause", None) or cause) from None
            except ray.exceptions.RayError as exc:  # the worker or its node died
                message = f"WorkerDied: the Ray worker running this cell died ({type(exc).__name__})"
                if attempts[cell.key] < ATTEMPTS:
                    queue.appendleft(cell)
                    yield ("retry", cell, message)
                else:
                    yield ("failed", cell, message)
                continue
            yield (kind, cell, payload)
    finally:
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 - best effort while stopping
                pass
        if started:
            ray.shutdown()
