"""Running the engine on several local processes without Ray (tests and benchmarks; any torch machine):
`run_local(world, fn, *args)` starts `world` processes with torchrun-style ranks in one gloo group on
127.0.0.1 (NCCL on GPUs when there is one per rank), runs `fn(rank, world, *args)` in each with one
intra-op thread, and returns the results in rank order. The ranks are forked from one server process
that has imported torch and the engine once (`multiprocessing`'s forkserver, started at the first call
and kept): a spawned rank spent seconds of CPU importing them again, per rank and per call. Each rank
runs with this process's environment, working folder and `sys.path` as they are at the call, as a
spawned one would. An exception in a rank is raised here with that rank's traceback. A rank that
dies by a signal after it saved its result and left the group (a crash as its process exits: gloo's
threads at exit, seen once in the suite) is reported as a warning, not as a failed run; one that dies
before is an error, and with `faulthandler` on, each rank prints where it crashed."""
from __future__ import annotations

import faulthandler
import logging
import os
import socket
import tempfile
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

log = logging.getLogger("openclaw")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELOAD = ["torch", "torch.distributed", "openclaw.engine.engine", "openclaw.engine.parallel.build"]
"""What the server the ranks are forked from imports once (the engine imports DCP, DTensor and the
pipelining schedules with it): none of it starts a thread or touches a GPU, so a fork of it is safe."""


def _entry(rank: int, world: int, port: int, out: str, backend: str, threads: int, env: dict[str, str], fn,
           args) -> None:
    os.environ.clear()  # the caller's environment now, not the server's from when it started
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    faulthandler.enable()  # a crash prints every thread's Python stack to stderr
    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    ok = False
    try:
        result = fn(rank, world, *args)
        ok = True
    except BaseException:
        result = {"error": traceback.format_exc()}
    finally:
        torch.save(result, f"{out}/rank{rank}.pt")
        if ok:  # every rank done with its sends (a pipeline's last isends) before any tears the group down:
            dist.barrier()  # a rank whose peer closed first aborted ("terminate called without an active exception")
        dist.destroy_process_group()


def run_local(world: int, fn: Callable[..., Any], *args, backend: str | None = None, threads: int = 1) -> list[Any]:
    """`fn` must be importable by name (a module-level function): it is pickled to the ranks."""
    backend = backend or ("nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo")
    with tempfile.TemporaryDirectory(prefix="openclaw-ranks-") as out:
        try:
            mp.get_context("forkserver").set_forkserver_preload(PRELOAD)  # used when the server starts
            mp.start_processes(_entry, args=(world, _free_port(), out, backend, threads, dict(os.environ), fn, args),
                               nprocs=world, start_method="forkserver")
        except mp.ProcessExitedException as e:
            if e.signal_name is None or not all(os.path.exists(f"{out}/rank{r}.pt") for r in range(world)):
                raise  # a rank died before it finished
            log.warning("every rank finished and saved its result; then rank %d died by %s while exiting",
                        e.error_index, e.signal_name)
        results = [torch.load(f"{out}/rank{r}.pt", weights_only=False) for r in range(world)]
    errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if isinstance(res, dict) and "error" in res]
    if errors:
        raise RuntimeError(errors[0])
    return results
