"""Ranks 1..N-1 of a tensor-parallel engine: load this rank's share, then run every step rank 0 sends.

A worker owns no scheduler and samples nothing: per step it receives rank 0's `StepInputs`, runs the
forward over its share of the model and KV cache (taking part in the same all-reduces), and computes
its vocabulary range of the requested logits for the all-gather. `None` tells it to stop.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

import torch

from kiln.config import EngineConfig
from kiln.distributed.comm import TPGroup, describe
from kiln.distributed.runner import CacheSetup, StepInputs, meta_to
from kiln.distributed.sharding import shard_model
from kiln.loader.model_loader import LoadedModel, load_model
from kiln.worker.forward import allocate_model_kv_caches

logger = logging.getLogger("kiln")


def load_rank_model(config: EngineConfig, group: TPGroup, model_path: str) -> LoadedModel:
    """This rank's share of the model (`model_path`: the resolved file or folder)."""
    m = config.model
    return load_model(model_path, m.dtype, group.device, quantized_weights=m.quantized_weights,
                      prepare_model=lambda model: shard_model(model, group), huge_pages=m.huge_page_weights)


def report_ready(group: TPGroup, error: str | None) -> list[str | None]:
    """Every rank says whether it loaded (None) or why not; all ranks get the list, in rank order."""
    return group.all_gather_objects(error)


def run_worker(group: TPGroup, config: EngineConfig, model_path: str) -> int:
    """Load, report, then serve steps until rank 0 says stop or the group breaks. Returns an exit code."""
    error: str | None = None
    loaded = None
    try:
        loaded = load_rank_model(config, group, model_path)
    except Exception as exc:  # rank 0 reports it to the user
        error = describe(exc)
    statuses = report_ready(group, error)
    if any(s is not None for s in statuses) or loaded is None:
        return 1
    setup: CacheSetup = group.broadcast()
    model = loaded.model
    kv_caches = allocate_model_kv_caches(model, setup.num_blocks, setup.block_size, setup.kv_cache_dtype)
    with torch.inference_mode():
        while True:
            step: StepInputs | None = group.broadcast()
            if step is None:
                return 0
            meta = meta_to(step.meta, group.device)
            hidden = model(step.token_ids.to(group.device), step.positions.to(group.device), meta, kv_caches)
            if step.logit_rows:
                model.compute_logits(hidden[step.logit_rows])


def spawned_worker(index: int, world: int, init_method: str, config: EngineConfig, model_path: str,
                   threads: int, parent_pid: int) -> None:
    """Entry point of a rank rank 0 spawned (torch.multiprocessing): rank index + 1."""
    _die_with_parent(parent_pid)
    from kiln.kernels import switches

    switches.configure(config.kernel)
    torch.set_num_threads(threads)
    rank = index + 1
    device = rank_device(config.model.device, rank)
    group = TPGroup.join(rank, world, init_method, device)
    code = 1
    try:
        code = run_worker(group, config, model_path)
    except (RuntimeError, ConnectionError) as exc:
        # rank 0 went away (its engine closed or died): nothing to serve any more
        logger.debug("tensor-parallel rank %d stops: %s", rank, exc)
    finally:
        group.leave()
    sys.exit(code)


def rank_device(device: str, rank: int) -> torch.device:
    """The device rank `rank` runs on: its own GPU (LOCAL_RANK under a launcher) on CUDA, else `device`."""
    d = torch.device(device)
    if d.type != "cuda":
        return d
    local = int(os.environ.get("LOCAL_RANK", rank % max(1, torch.cuda.device_count())))
    return torch.device("cuda", local)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to kill this process when the thread that spawned it exits (SIGTERM, crash or close of
    the engine): a worker never outlives its engine. Elsewhere the closed sockets end it instead."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)
