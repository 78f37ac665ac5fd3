"""Start a tensor-parallel engine: the ranks, each rank's share of the model, rank 0's LLMEngine.

Without `distributed_init` rank 0 (this process) spawns ranks 1..N-1 with torch.multiprocessing and
they meet over TCP on 127.0.0.1. With `env://` a launcher started every rank (`torchrun --nnodes 2
--nproc-per-node 2 ... kiln serve --tensor-parallel-size 4 --distributed-init env://`): rank 0 goes
on to build the engine, every other rank serves steps until rank 0 stops and then exits the process.
"""

from __future__ import annotations

import os
import socket
from typing import Any, TypeVar

import torch

from kiln.config import EngineConfig
from kiln.distributed.comm import TensorParallelError, TPGroup, describe
from kiln.distributed.runner import TPModelRunner
from kiln.distributed.worker import (
    load_rank_model,
    rank_device,
    report_ready,
    run_worker,
    spawned_worker,
)

# kiln.engine.LLMEngine (not imported: kiln.engine imports this package); built as
# engine_cls(loaded, cache_config, scheduler_config, speculative_config, runner_factory=...).
EngineT = TypeVar("EngineT")


class RankProcesses:
    """The worker processes rank 0 spawned (rank i + 1 is `processes[i]`)."""

    def __init__(self, context: Any) -> None:
        self.context = context

    @property
    def processes(self) -> list[Any]:
        return list(self.context.processes)

    def dead(self) -> list[tuple[int, int]]:
        """(rank, exit code) of every worker that has exited."""
        return [(i + 1, p.exitcode) for i, p in enumerate(self.processes) if p.exitcode is not None]

    def stop(self, timeout: float = 10.0) -> None:
        """Wait for the workers to exit; terminate, then kill, any still running."""
        for p in self.processes:
            p.join(timeout)
        for p in self.processes:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def build_tensor_parallel_engine(engine_cls: type[EngineT], config: EngineConfig) -> EngineT:
    """Rank 0: start (or join) the group, load rank 0's share, build the engine. Other ranks (env://)
    serve steps and then end the process with SystemExit(0) (or 1 when their load failed)."""
    from kiln.hub import resolve_model

    par = config.parallel
    if config.speculative is not None and config.speculative.method != "ngram":
        raise ValueError("speculative decoding with a draft model does not run under tensor parallel yet; "
                         "use --speculative-model ngram or --tensor-parallel-size 1")
    threads = par.rank_threads(cores())
    torch.set_num_threads(threads)
    model_path = str(resolve_model(config.model.model))  # once, before any other rank reads it
    world = par.tensor_parallel_size
    processes: RankProcesses | None = None
    if par.distributed_init == "env://":
        rank = int(os.environ.get("RANK", "0"))
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if env_world != world:
            raise ValueError(f"--tensor-parallel-size {world} but the launcher started WORLD_SIZE={env_world} ranks; "
                             f"give the launcher {world} processes in all")
        group = TPGroup.join(rank, world, "env://", rank_device(config.model.device, rank))
        if rank != 0:
            code = 1
            try:
                code = run_worker(group, config, model_path)
            except (RuntimeError, ConnectionError):
                pass  # rank 0 went away
            finally:
                group.leave()
            raise SystemExit(code)
    else:
        import torch.multiprocessing as mp

        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = mp.start_processes(spawned_worker, args=(world, init_method, config, model_path, threads,
                                                           os.getpid()),
                                     nprocs=world - 1, join=False, daemon=True, start_method="spawn")
        processes = RankProcesses(context)
        try:
            group = TPGroup.join(0, world, init_method, rank_device(config.model.device, 0))
        except BaseException:
            processes.stop(0.0)
            raise
    try:
        return _build_rank0(engine_cls, config, group, processes, model_path)
    except BaseException:
        if processes is not None:
            processes.stop(0.0)
        group.leave()
        raise


def _build_rank0(engine_cls: type[EngineT], config: EngineConfig, group: TPGroup,
                 processes: RankProcesses | None, model_path: str) -> EngineT:
    error: str | None = None
    loaded = None
    try:
        loaded = load_rank_model(config, group, model_path)
    except Exception as exc:
        error = describe(exc)
        load_error = exc
    statuses = report_ready(group, error)
    if loaded is None:
        raise load_error
    failed = [(r, s) for r, s in enumerate(statuses) if s is not None]
    if failed:
        raise TensorParallelError("; ".join(f"tensor-parallel rank {r} could not load the model: {s}"
                                            for r, s in failed))

    def runner_factory(model: Any, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto",
                       kv_groups: list | None = None) -> TPModelRunner:
        return TPModelRunner(model, num_blocks, block_size, kv_cache_dtype, kv_groups, group=group,
                             processes=processes)

    return engine_cls(loaded, config.cache, config.scheduler, config.speculative, runner_factory=runner_factory)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
