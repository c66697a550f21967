"""Training across processes: the process group, and the few collectives the loop needs.

A fit trains with ``torch.distributed`` when a process group of more than one
process is initialised, or when ``torchrun`` launched it (``WORLD_SIZE`` > 1,
with ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set): the
fit then initialises the default group itself, ``"gloo"`` for the CPU and
``"nccl"`` for CUDA, leaves it for later fits and destroys it at exit.
Everything here uses the default group.
"""

from __future__ import annotations

import atexit
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

__all__ = ["all_gather", "average_batch_statistics", "broadcast", "join_process_group",
           "reduce_sum", "torchrun_world", "wrap_network"]

_TORCHRUN = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def torchrun_world() -> int:
    """``WORLD_SIZE`` when torchrun's environment is complete, else 1."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1
    return world if world > 1 and all(name in os.environ for name in _TORCHRUN) else 1


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _training_device(device: torch.device, requested: Any) -> torch.device:
    """The device of this process: on CUDA without an index, the one of its local rank."""
    if device.type == "mps":
        if str(requested) != "auto":
            raise ValueError("device='mps' cannot train across processes: torch.distributed "
                             "has no backend for MPS tensors. Pass device='cpu'.")
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        local = os.environ.get("LOCAL_RANK")
        return torch.device("cuda", int(local) if local is not None
                            else torch.cuda.current_device())
    return device


def join_process_group(device: torch.device,
                       requested: Any) -> tuple[int, int, torch.device] | None:
    """``(rank, world, device)`` when this fit trains across processes, else None.

    Initialises the default process group when torchrun launched the process
    and nobody has yet. ``device`` is the resolved ``requested`` device; CUDA
    without an index becomes ``cuda:LOCAL_RANK``.

    Raises
    ------
    ValueError
        The group's backend cannot reduce tensors of the training device
        (NCCL for a CPU fit), or MPS was asked for.
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if torchrun_world() == 1:
            return None
        device = _training_device(device, requested)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(_destroy)
    elif dist.get_world_size() == 1:
        return None
    else:
        device = _training_device(device, requested)
    backend = str(dist.get_backend())
    if device.type != "cuda" and "gloo" not in backend:
        raise ValueError(
            f"The process group's backend is {backend!r}, which cannot reduce tensors on "
            f"device={str(device)!r}. Train on CUDA (device='cuda'), or initialise the "
            "group with torch.distributed.init_process_group('gloo') for the CPU.")
    return dist.get_rank(), dist.get_world_size(), device


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` (any picklable object), on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (and returned)."""
    dist.all_reduce(tensor)
    return tensor


def average_batch_statistics(model: nn.Module, world: int) -> None:
    """Average over the ranks the running statistics of BatchNorm layers in train mode.

    Those layers normalised each rank's piece of a batch with the piece's
    statistics, and each rank averaged its own over the epoch; their mean
    makes the layers identical on every rank. Layers in eval mode kept their
    statistics, already identical.
    """
    tensors = [buffer for module in model.modules()
               if isinstance(module, _BatchNorm) and module.training
               and module.track_running_stats
               for buffer in (module.running_mean, module.running_var)]
    if not tensors:
        return
    flat = reduce_sum(torch.cat([tensor.reshape(-1) for tensor in tensors]))
    flat /= world
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


class _Network(nn.Module):
    """What a training step runs, as one module: the network, or its stages after the trunk.

    DistributedDataParallel reduces the gradients of the module it wraps and
    expects its ``forward`` to be called; the loop sometimes runs only
    :meth:`~skt.training.Trunk.rest`, whose modules are the network's.
    The source head of learning without forgetting and DANN's domain
    classifier are submodules too, so that their gradients are reduced with
    the others (both run on the recorded penultimate features, outside
    ``forward``, within the same backward pass).
    """

    def __init__(self, model: nn.Module, source_head: nn.Module | None,
                 domain_classifier: nn.Module | None = None) -> None:
        super().__init__()
        self.model = model
        self.source_head = source_head
        self.domain_classifier = domain_classifier
        self.trunk = None
        self.trained: list[int] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.trunk is not None:
            return self.trunk.rest(images, self.model.training)
        return self.model(images)


# torch 2.13 renamed ``broadcast_buffers``; both mean "do not send rank 0's buffers every step".
_DDP_PARAMETERS = inspect.signature(DistributedDataParallel).parameters
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_PARAMETERS
                   else {"broadcast_buffers": False})


def wrap_network(model: nn.Module, source_head: nn.Module | None, device: torch.device,
                 previous: DistributedDataParallel | None = None, *,
                 domain_classifier: nn.Module | None = None) -> DistributedDataParallel:
    """DistributedDataParallel around ``model`` and its helpers: ``previous`` if it fits.

    The helpers (``source_head``, ``domain_classifier``) may be None. DDP
    registers the parameters that require gradients when it is built, so a
    new wrapper is built when they are not those ``previous`` reduces (a
    stage thawed). Building one broadcasts rank 0's parameters and buffers;
    buffers are not broadcast at each step, since fixed BatchNorm statistics
    are identical on every rank and batch statistics are averaged at the end
    of each epoch (:func:`average_batch_statistics`).
    """
    network = _Network(model, source_head, domain_classifier)
    trained = [id(p) for p in network.parameters() if p.requires_grad]
    if previous is not None and previous.module.trained == trained:
        return previous
    network.trained = trained
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda"
                                   else None, **_NO_BUFFER_SYNC)
