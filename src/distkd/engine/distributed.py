"""Process-group helpers: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; a single process needs nothing."""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from distkd.errors import ConfigError

T = TypeVar("T")
_created: list[bool] = []  # non-empty while this module's init_from_env owns the default process group


def init_from_env(device_kind: str) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU) and return this rank's device.

    ``device_kind``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N is used by a single process; under torchrun
    each process takes its ``LOCAL_RANK``).
    """
    cuda = device_kind.startswith("cuda") or (device_kind == "auto" and torch.cuda.is_available())
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
        _created.append(True)
    if cuda:
        index = int(os.environ.get("LOCAL_RANK", "0")) if several else int(device_kind.partition(":")[2] or 0)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def close() -> None:
    """Leave the process group :func:`init_from_env` created (one its caller made is left alone).

    A DistributedDataParallel wrapper still alive at interpreter exit, or when its group is destroyed,
    sometimes aborts the process ("terminate called without an active exception"; about 1 run in 10 with
    gloo here). So the finished run's wrapper, usually held in reference cycles, is collected first.
    """
    if _created and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    _created.clear()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def process_batch(global_batch: int, world: int, option: str = "data.batch_size") -> int:
    """Each process's share of a global training batch: ``global_batch / world``, which must divide evenly.

    The config's batch is the global one (the batch an optimizer step sees over all processes), so a run
    keeps its recipe on any number of processes; a share that does not divide is an error, never rounded.
    """
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if global_batch % world:
        fits = [n for n in range(1, global_batch + 1) if global_batch % n == 0]
        raise ConfigError(f"{option}={global_batch} (the global batch) does not divide over {world} processes; "
                          f"set {option} to a multiple of {world}, or run {global_batch} on one of "
                          f"{', '.join(map(str, fits[:8]))}{', ...' if len(fits) > 8 else ''} processes")
    return global_batch // world


def process_eval_batch(global_batch: int, world: int) -> int:
    """Each process's share of the global evaluation batch, rounded up (evaluation results do not depend on it)."""
    return -(-global_batch // world)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Replace ``model``'s BatchNorm layers by SyncBatchNorm, in place, when several processes run (each
    training step then normalises with the statistics of the global batch); one process: unchanged.

    torch's SyncBatchNorm synchronises CUDA tensors only, so several CPU processes are a ConfigError.
    """
    if world_size() == 1:
        return model
    if device.type != "cuda":
        raise ConfigError(f"train.sync_bn needs CUDA: torch's SyncBatchNorm cannot synchronise {device.type} "
                          "tensors; set train.sync_bn=false for a run on several CPU processes")
    return convert_batchnorm(model)


def convert_batchnorm(model: nn.Module) -> nn.Module:
    """``model`` with every BatchNorm layer replaced by a SyncBatchNorm holding the same parameters and buffers
    (same state-dict keys), in place; a model that is itself one BatchNorm layer is an error."""
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if converted is not model:
        raise ConfigError("train.sync_bn cannot convert a model that is a single BatchNorm layer; wrap it in a module")
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the student when several processes run and it has something to train;
    the model itself otherwise."""
    if world_size() == 1 or not any(p.requires_grad for p in model.parameters()):
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def mean(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Average each scalar tensor over all processes (identity for one process)."""
    if world_size() == 1:
        return values
    keys = sorted(values)
    stacked = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(stacked)
    return dict(zip(keys, stacked / world_size(), strict=True))


def average_gradients(params: list[nn.Parameter]) -> None:
    """Replace each parameter's gradient by its mean over all processes, in one all-reduce (a missing gradient
    counts as zeros and becomes one, so every rank steps the same parameters)."""
    if world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size()
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()


def sum_tensor(value: Tensor) -> Tensor:
    """Sum a tensor over all processes, in place (identity for one process)."""
    if world_size() > 1:
        dist.all_reduce(value)
    return value


def broadcast_buffers(model: nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm statistics), in place (nothing for one process).

    DDP sends rank 0's buffers at the start of each forward, so after the last training step every rank
    holds the statistics of its own last batch; evaluating then would mix models.
    """
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def barrier() -> None:
    """Wait for every process (nothing for one process)."""
    if world_size() > 1:
        dist.barrier()


def main_first(build: Callable[[], T]) -> T:
    """``build()`` on rank 0 first, then on the other ranks (e.g. to find a cache rank 0 wrote to disk)."""
    if is_main():
        value = build()
        barrier()
        return value
    barrier()
    return build()


def broadcast_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Give every process rank 0's tensors, in place; the other ranks pass tensors of the same shapes."""
    if world_size() > 1:
        for value in state.values():
            flat = value.contiguous()  # channels_last weights travel as contiguous copies
            dist.broadcast(flat, src=0)
            if flat is not value:
                value.copy_(flat)
    return state


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank (``[value]`` for one process)."""
    if world_size() == 1:
        return [value]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, value)
    return out
