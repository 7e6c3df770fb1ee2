"""A tensor-parallel group of engines in lockstep (SPMD): rank 0 is the user's engine, ranks 1..N-1 worker processes.

Every rank runs the same engine (scheduler, block manager, sampler) over the same calls in the same order; only the
model's math is split (lragent.distributed.tensor_parallel), and after its all-reduces every rank has the same
logits, so the same tokens: no token is ever sent between ranks. Rank 0 starts the workers
(`python -m lragent.engine.tp_worker`), sends each the EngineConfig, and then forwards every engine call that
changes state (`LLMEngine._forward`: add_request with its resolved id and seed, abort, step, adapter loads,
reset_prefix_cache, close) down each worker's stdin, a pipe: a worker whose rank 0 is gone reads end-of-file and
exits, so no worker outlives its engine.

Rendezvous is a TCPStore on a free local port (single host); the model's collectives run in torch.distributed's
default process group: NCCL on GPUs, gloo on the CPU (tests). One tensor-parallel engine per process at a time.
"""

from __future__ import annotations

import logging
import pickle
import subprocess
import sys
import time
import weakref
from datetime import timedelta
from typing import IO, Any

import torch
import torch.distributed as dist

from lragent.config import EngineConfig
from lragent.distributed.tensor_parallel import Shard, check_divisible, read_model_config

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
STORE_TIMEOUT = timedelta(minutes=30)  # the slowest rank's start-up (a 70B checkpoint read) fits in it
STOP_WAIT_S = 30.0


def ready_key(rank: int) -> str:
    return f"lragent/ready/{rank}"


def started_key(rank: int) -> str:
    return f"lragent/started/{rank}"


def join_group(shard: Shard, store: dist.Store, device: torch.device) -> None:
    """Join the default process group as `shard.rank` (NCCL on CUDA, gloo on the CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=store, rank=shard.rank, world_size=shard.size, timeout=STORE_TIMEOUT)


class TPGroup:
    """Rank 0's handle on the workers: start them, forward calls, stop them."""

    def __init__(self, config: EngineConfig, device: torch.device):
        size = config.tensor_parallel_size
        check_divisible(read_model_config(config.model), size)  # before any process starts
        if device.type == "cuda" and device.index is not None and device.index + size > torch.cuda.device_count():
            raise ValueError(
                f"tensor_parallel_size={size} from {device} needs {device.index + size} GPUs; "
                f"{torch.cuda.device_count()} are visible"
            )
        if dist.is_initialized():
            raise RuntimeError("a tensor-parallel engine already runs in this process; close it first (one at a time)")
        self.size = size
        store = dist.TCPStore(HOST, 0, size, True, timeout=STORE_TIMEOUT, wait_for_workers=False)
        self.store = store
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-m", "lragent.engine.tp_worker", str(rank), str(size), str(store.port)],
                stdin=subprocess.PIPE,
            )
            for rank in range(1, size)
        ]
        self._finalizer = weakref.finalize(self, _stop, list(self.processes))
        self._closed = False
        for proc in self.processes:
            self._send(proc, config)
        self._wait_for(started_key, "joining")
        join_group(Shard(0, size), store, device)

    def wait_ready(self) -> None:
        """Block until every worker has built its engine; RuntimeError with its reason if one failed."""
        self._wait_for(ready_key, "starting its engine")
        for rank in range(1, self.size):
            error = self.store.get(ready_key(rank)).decode()
            if error:
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start its engine: {error}")

    def _wait_for(self, key, doing: str) -> None:
        keys = [key(rank) for rank in range(1, self.size)]
        while not self.store.check(keys):
            for rank, proc in enumerate(self.processes, start=1):
                if proc.poll() is not None and not self.store.check([key(rank)]):
                    raise RuntimeError(f"tensor-parallel rank {rank} exited with code {proc.returncode} {doing}")
            time.sleep(0.02)

    def call(self, method: str, *args: Any, **kwargs: Any) -> None:
        """Have every worker run `engine.<method>(*args, **kwargs)` (in call order; no reply)."""
        for proc in self.processes:
            self._send(proc, (method, args, kwargs))

    @staticmethod
    def _send(proc: subprocess.Popen, message: object) -> None:
        pipe: IO[bytes] | None = proc.stdin
        assert pipe is not None
        pickle.dump(message, pipe, protocol=pickle.HIGHEST_PROTOCOL)
        pipe.flush()

    def close(self) -> None:
        """Close every worker's engine, wait for the processes to exit, leave the process group; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.call("close")
        except OSError:  # a worker already gone: _stop reaps it
            logger.warning("a tensor-parallel worker was gone before close")
        self._finalizer()
        if dist.is_initialized():
            dist.destroy_process_group()


def _stop(processes: list[subprocess.Popen]) -> None:
    """End-of-file on each worker's stdin (it exits), then wait; kill what has not exited by STOP_WAIT_S."""
    for proc in processes:
        if proc.stdin is not None and not proc.stdin.closed:
            try:
                proc.stdin.close()
            except OSError:
                pass
    deadline = time.monotonic() + STOP_WAIT_S
    for proc in processes:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("tensor-parallel worker %d did not exit; killing it", proc.pid)
            proc.kill()
            proc.wait()
