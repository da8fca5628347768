"""Multi-process support for the anchor: FSDP2 row shards and bases computed once across ranks.

Sharded penalty (DESIGN.md "Scale-out"). FSDP2 shards every weight by rows, W = [W_1; …; W_r]. Then

    U_kᵀ W V_k = Σ_r U_rᵀ W_r V_k          (U_r: the rows of U_k matching W_r)

so each rank computes its k×k partial product, one all-reduce sums them (all matrices in one flat buffer), and the
local gradient shard is 2λ·U_r A V_kᵀ. No rank ever gathers W; each keeps only its rows of U_k (and of W0 at full
rank), so anchor memory shrinks with the world size like the model does.

Bases once. With several processes, matrix i is decomposed by rank ``owner(i)`` only (greedy balance by SVD cost),
then broadcast; the cache is written by the owner. The authors' release had every rank decompose every matrix.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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


def _backend_device_types(backend: str) -> set[str]:
    """Device types a process-group backend string serves: ``nccl`` -> {cuda}; ``gloo`` -> {cpu, cuda};
    ``cuda:nccl,cpu:gloo`` (what accelerate creates for FSDP2 with FULL_STATE_DICT) -> {cuda, cpu}."""
    backend = backend.lower()
    if ":" in backend:
        return {part.split(":", 1)[0].strip() for part in backend.split(",") if ":" in part}
    return {"nccl": {"cuda"}, "gloo": {"cpu", "cuda"}, "mpi": {"cpu"}}.get(backend, {"cpu", "cuda"})


def collective_device(preferred: torch.device, group=None) -> torch.device:
    """Where a buffer for a collective on ``group`` must live: ``preferred`` when the backend serves that device
    type, else the backend's device. A DeepSpeed or plain multi-GPU launch creates an NCCL-only group, which has
    no CPU backend, so a CPU buffer there fails ("No backend type associated with device type cpu")."""
    types = _backend_device_types(str(dist.get_backend(group)))
    if preferred.type in types:
        return preferred
    if "cuda" in types:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
