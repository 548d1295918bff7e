"""Spawning gloo test processes over loopback (shared by the distributed tests)."""
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, world: int, *args, timeout: float = 120) -> None:
    """Run worker(rank, world, port, *args) in `world` processes; wait at most `timeout` s,
    then end any process still alive (a hung collective must not hang the suite)."""
    ctx = mp.spawn(worker, args=(world, free_port(), *args), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


def failure(call):
    """(exception type name, message, seconds until it was raised) of call(), or None if it
    returned: what a rank reports back, so a test can check that every rank failed alike, promptly."""
    tic = time.monotonic()
    try:
        call()
    except Exception as exc:
        return type(exc).__name__, str(exc), time.monotonic() - tic
    return None
