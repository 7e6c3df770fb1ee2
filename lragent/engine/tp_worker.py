"""A tensor-parallel worker: `python -m lragent.engine.tp_worker RANK SIZE PORT`, started by rank 0's `TPGroup`.

Reads the EngineConfig from stdin, joins the group, builds its engine (rank RANK's slice of the model) and then
replays the calls rank 0 forwards, one pickled (method, args, kwargs) at a time, until `close` or end-of-file.
"""

from __future__ import annotations

import logging
import pickle
import sys

import torch.distributed as dist

from lragent.config import EngineConfig
from lragent.distributed.tensor_parallel import Shard
from lragent.engine.llm_engine import LLMEngine
from lragent.engine.tp_group import HOST, STORE_TIMEOUT, join_group, ready_key, started_key


def main(argv: list[str]) -> int:
    rank, size, port = map(int, argv)
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(levelname)s %(name)s: %(message)s")
    stdin = sys.stdin.buffer
    config = pickle.load(stdin)
    assert isinstance(config, EngineConfig)
    shard = Shard(rank, size)
    store = dist.TCPStore(HOST, port, size, False, timeout=STORE_TIMEOUT)
    store.set(started_key(rank), "")
    join_group(shard, store, shard.device(config.device))
    try:
        engine = LLMEngine(config, tp_rank=rank)
    except Exception as exc:  # rank 0 raises it (or its own error, the same one when it is the config's)
        store.set(ready_key(rank), f"{type(exc).__name__}: {exc}")
        logging.getLogger(__name__).warning("engine start failed: %s: %s", type(exc).__name__, exc)
        return 1
    store.set(ready_key(rank), "")
    while True:
        try:
            method, args, kwargs = pickle.load(stdin)
        except EOFError:  # rank 0 is gone
            engine.close()
            break
        getattr(engine, method)(*args, **kwargs)
        if method == "close":
            break
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
