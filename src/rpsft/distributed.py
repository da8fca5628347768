"""Multi-process support for the anchor: FSDP2 row shards and bases computed once across ranks.

Sharded penalty (DESIGN.md "Scale-out"). FSDP2 shards every weight by rows, W = [W_1; …; W_r]. Then

    U_kᵀ W V_k = Σ_r U_rᵀ W_r V_k          (U_r: the rows of U_k matching W_r)

so each rank computes its k×k partial product, one all-reduce sums them (all matrices in one flat buffer), and the
local gradient shard is 2λ·U_r A V_kᵀ. No rank ever gathers W; each keeps only its rows of U_k (and of W0 at full
rank), so anchor memory shrinks with the world size like the model does.

Bases once. With several processes, matrix i is decomposed by rank ``owner(i)`` only (greedy balance by SVD cost),
then broadcast, through NCCL on the GPU whenever the group has it (:func:`collective_device`); the cache is written
by the owner. The authors' release had every rank decompose every matrix.

Rank 0 decides (:func:`main_decides`): what every rank must agree on and only one may do — reading and clearing a
run directory before ``--resume`` or ``--overwrite`` — runs on rank 0 alone, and the others take its outcome.
"""

from __future__ import annotations

import pickle
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def row_shard(p: torch.Tensor) -> tuple[torch.Tensor, int, object]:
    """(local rows, global row offset, process group) of an FSDP2 ``Shard(0)`` DTensor parameter."""
    from torch.distributed.tensor import Shard

    placements = p.placements
    if len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise NotImplementedError(
            f"the sharded anchor supports FSDP2's row sharding (Shard(0) on a 1-D mesh); got {placements}. "
            "Use fully_shard with its default placement, or DDP."
        )
    local = p.to_local()
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
        row0 = int(offset[0])
    except ImportError:  # pragma: no cover - same rule as torch.chunk, which FSDP2 uses
        size = -(-p.shape[0] // p.device_mesh.size())
        row0 = min(p.device_mesh.get_local_rank() * size, p.shape[0])
    return local, row0, p.device_mesh.get_group()


def all_reduce_sum_(tensors: list[torch.Tensor], group=None) -> None:
    """Sum each tensor across ranks in place, with one collective for the whole list."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    i = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[i:i + n].view_as(t))
        i += n


def assign_owners(shapes: list[tuple[int, int]], ks: list[int], world_size: int) -> list[int]:
    """Greedy longest-processing-time assignment of SVDs to ranks (cost ∝ m·n·min(m, n))."""
    order = sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1] * min(shapes[i]))
    load = [0.0] * world_size
    owners = [0] * len(shapes)
    for i in order:
        if ks[i] <= 0:
            continue
        r = min(range(world_size), key=load.__getitem__)
        owners[i] = r
        load[r] += shapes[i][0] * shapes[i][1] * min(shapes[i])
    return owners


def broadcast_(t: torch.Tensor, src: int) -> torch.Tensor:
    dist.broadcast(t, src=src)
    return t


def _backend_map(backend: str) -> dict[str, str]:
    """Device type -> backend of a process-group backend string: ``nccl`` -> {cuda: nccl}; ``gloo`` -> {cpu: gloo,
    cuda: gloo}; ``cuda:nccl,cpu:gloo`` (what accelerate creates for FSDP2 with a CPU-offload or FULL_STATE_DICT
    setting) -> {cuda: nccl, cpu: gloo}."""
    backend = backend.lower()
    if ":" in backend:
        pairs = (part.split(":", 1) for part in backend.split(",") if ":" in part)
        return {device.strip(): name.strip() for device, name in pairs}
    devices = {"nccl": ("cuda",), "gloo": ("cpu", "cuda"), "mpi": ("cpu",)}.get(backend, ("cpu", "cuda"))
    return {device: backend for device in devices}


def collective_device(preferred: torch.device, group=None) -> torch.device:
    """Where a buffer for a collective on ``group`` lives: this process's GPU whenever the group reaches CUDA
    through NCCL, else ``preferred`` when the backend serves that device type, else the backend's device.

    NCCL first: a DeepSpeed or plain multi-GPU launch creates an NCCL-only group, where a CPU buffer fails ("No
    backend type associated with device type cpu"); and in accelerate's ``cuda:nccl,cpu:gloo`` group a CPU buffer
    would go through gloo over TCP — the bases of a 7B model are ≈ 7.5 GB — while NCCL moves it GPU to GPU. The
    caller moves what it receives back to where it keeps it."""
    backends = _backend_map(str(dist.get_backend(group)))
    if backends.get("cuda") == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if preferred.type in backends:
        return preferred
    if "cuda" in backends:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _portable(e: Exception) -> Exception:
    """``e`` itself when it survives pickling (the usual case: a ValueError, FileExistsError...), else a
    RuntimeError with its type and message, so a broadcast never fails on an exception of its own."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


def main_decides(decide: Callable[[], T]) -> T:
    """``decide()`` on rank 0 only; every other rank waits for its outcome and returns the same value, or raises
    the same exception. Alone (no process group, or a group of one) it is ``decide()``.

    For what must happen once and be agreed by all: ``--overwrite`` deleting the old run (every rank deleting at
    once raced: entries vanished under the others' ``rmtree``, a FileNotFoundError) and ``--resume`` choosing the
    checkpoint (a rank looking while rank 0 rewrites the directory could see another one). The broadcast doubles as
    the barrier: no rank goes on before rank 0 has finished. Needs the process group started (accelerate's
    ``PartialState``) when several processes run; one pickled object goes over the default group."""
    rank, size = world()
    if size == 1:
        return decide()
    if rank == 0:
        try:
            box = [(True, decide())]
        except Exception as e:
            dist.broadcast_object_list([(False, _portable(e))], src=0)
            raise
        dist.broadcast_object_list(box, src=0)
        return box[0][1]
    box = [None]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value
