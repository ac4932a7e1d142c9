"""torchrun integration: process-group set-up and rank helpers.

Library code calls these and works unchanged with one process (no torchrun) or many. Multi-node
runs use torchrun's own rendezvous (`--nnodes`, `--rdzv-endpoint`); nothing here is home-made.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def parse_device(text: str) -> torch.device:
    """--device text -> torch.device, refusing a device this machine does not have (before any work)."""
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise ValueError(f"--device {text!r}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {text}: CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {text}: unsupported device type; use cpu or cuda")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {text}: MPS is not available on this machine; use --device cpu")
    return dev


def init_from_env(device: str | None = None) -> torch.device:
    """Join the process group torchrun describes in the environment (a no-op without torchrun).

    NCCL on CUDA, gloo on CPU. Returns this process's device."""
    dev = parse_device(device) if device else default_device()
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, timeout=datetime.timedelta(minutes=30), device_id=dev if dev.type == "cuda" else None
        )
    return dev


def shutdown() -> None:
    if is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over processes (t itself with one process)."""
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= world_size()
    return t


def broadcast_object(obj):
    """rank 0's Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """The elementwise maximum of t over processes (t itself with one process)."""
    if is_initialized():
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t


def host_group():
    """A process group for small CPU tensors (gloo): flags can be agreed on without waiting for the
    GPU. Every rank must call this at the same point (None with one process or a gloo default group)."""
    if not is_initialized() or dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def agree_on_error(error: BaseException | None) -> None:
    """Raise on every rank when one rank failed (e.g. rank 0 could not lock the run directory)."""
    messages = [str(error) if error else None]
    if is_initialized():
        messages = [None] * world_size()
        dist.all_gather_object(messages, str(error) if error else None)
    if error is not None:
        raise error
    for m in messages:
        if m is not None:
            raise RuntimeError(m)
