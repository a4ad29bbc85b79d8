"""Data parallelism for PPO on ``torch.distributed``, the field's way (rsl_rl's multi-GPU
PPO, IsaacLab, DD-PPO): every rank owns its envs, its rollout and a policy copy; the
gradients of every step are averaged with one all-reduce of a flat buffer; statistics
that every rank must share (the normalisers) are merged from all ranks' moments in rank
order, so every rank computes the same numbers; rank 0 writes.

Launch with ``torchrun`` (it sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); without it ``init_world`` returns a world of one and
nothing here communicates. Backends: gloo on the CPU; on CUDA nccl for device tensors and
gloo for the CPU-side statistics.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from policies.normalizer import RunningNormalizer

# A rank that dies leaves the others blocked in a collective until this runs out; torchrun
# also stops the job when a worker exits non-zero (its default), which is what ends it
# within seconds.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=5)


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


SINGLE = World()  # one process: every collective here is a no-op


def init_world(device: torch.device | str = "cpu", timeout=DEFAULT_TIMEOUT) -> World:
    """Join the job ``torchrun`` started (gloo on CPU, nccl on CUDA), or a world of one.

    Idempotent: an initialised default process group is reused.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        # On CUDA, nccl for device tensors and gloo for the CPU-side ones (normaliser
        # moments, checksums): the backend is picked by the tensor's device.
        backend = "cpu:gloo,cuda:nccl" if torch.device(device).type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timeout)
    return World(rank, size, local_rank)


def average_gradients(flat_grads: torch.Tensor, world: World) -> None:
    """Average ``flat_grads`` (every parameter's gradient in one buffer, as
    ``ppo.gradient_buffer`` lays them out) over all ranks, in place: one all-reduce per
    step, as rsl_rl does, with no copy in or out."""
    if not world.distributed:
        return
    dist.all_reduce(flat_grads, op=dist.ReduceOp.SUM)
    flat_grads /= world.size


def broadcast_module(module: nn.Module, world: World, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (at the start, and after
    anything that changes shapes), so all ranks hold bit-identical models."""
    if not world.distributed:
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


def batch_moments(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``[count, mean..., M2...]`` of the samples ``x`` ``[..., *shape]``, float64, flat."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, *shape)
    mean = x.mean(axis=0)
    m2 = ((x - mean) ** 2).sum(axis=0)
    return np.concatenate([[float(x.shape[0])], mean.ravel(), m2.ravel()])


def merge_moments(
    count: float, mean: np.ndarray, var: np.ndarray, moments: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Chan et al.'s parallel merge of running statistics ``(count, mean, var)`` with a
    batch's ``batch_moments``; returns the merged ``(count, mean, var)``."""
    size = mean.size
    n_b, mean_b = moments[0], moments[1 : 1 + size].reshape(mean.shape)
    m2_b = moments[1 + size :].reshape(mean.shape)
    n = count + n_b
    delta = mean_b - mean
    new_mean = mean + delta * (n_b / n)
    m2 = var * count + m2_b + delta * delta * (count * n_b / n)
    return n, new_mean, m2 / n


def gather_moments(moments: np.ndarray, world: World) -> list[np.ndarray]:
    """Every rank's ``batch_moments``, in rank order (the same list on every rank)."""
    if not world.distributed:
        return [moments]
    local = torch.from_numpy(np.ascontiguousarray(moments, dtype=np.float64))
    gathered = [torch.empty_like(local) for _ in range(world.size)]
    dist.all_gather(gathered, local)
    return [g.numpy() for g in gathered]


@torch.no_grad()
def merge_normalizer(
    normalizer: RunningNormalizer,
    before: tuple[float, np.ndarray, np.ndarray],
    local_batch: np.ndarray,
    world: World,
) -> None:
    """Set ``normalizer`` to ``before`` (count, mean, var) merged with every rank's
    ``local_batch`` ``[..., *shape]`` in rank order: identical statistics on every rank,
    equal (to rounding) to one process having seen all the data.

    A rank may have updated its normaliser from its own data meanwhile (the reward scale
    needs the running variance at every step); that local state is replaced.
    """
    shape = tuple(normalizer.mean.shape)
    count, mean, var = before
    for moments in gather_moments(batch_moments(local_batch, shape), world):
        count, mean, var = merge_moments(count, mean, var, moments)
    device = normalizer.mean.device
    normalizer.mean.copy_(torch.as_tensor(mean, dtype=torch.float64, device=device))
    normalizer.var.copy_(torch.as_tensor(var, dtype=torch.float64, device=device))
    normalizer.count.fill_(float(count))


def statistics(normalizer: RunningNormalizer) -> tuple[float, np.ndarray, np.ndarray]:
    """``(count, mean, var)`` of ``normalizer`` as float64 numpy copies."""
    return (
        float(normalizer.count),
        normalizer.mean.detach().cpu().numpy().copy(),
        normalizer.var.detach().cpu().numpy().copy(),
    )


def mean_over_ranks(value: float, world: World) -> float:
    """The mean of a per-rank number (e.g. the approximate KL that decides an early stop:
    every rank must take the same decision)."""
    if not world.distributed:
        return value
    total = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / world.size


def sync_normalizer(normalizer: RunningNormalizer, batch: np.ndarray, world: World) -> None:
    """``normalizer.update(batch)``, with every rank's batch when data-parallel."""
    if world.distributed:
        merge_normalizer(normalizer, statistics(normalizer), batch, world)
    else:
        normalizer.update(batch)


class RanksDiverged(RuntimeError):
    """The ranks' models differ: a collective was skipped or a decision taken locally."""


class NonFiniteWeights(RuntimeError):
    """A parameter or buffer holds NaN or infinity: training diverged (not a bug in the
    data parallelism). Raised on every rank alike."""


@torch.no_grad()
def check_in_sync(
    module: nn.Module, world: World, update: int | None = None, step: int | None = None
) -> None:
    """Raise ``NonFiniteWeights`` if any rank's parameters or buffers hold NaN or infinity
    (naming the first such tensor, and ``update``/``step``, the update and env step just
    taken, where given), else ``RanksDiverged`` unless every rank holds the same ones (a
    float64 checksum per rank, gathered; one small collective per call, and one more where
    a checksum is not finite). In a world of one only the finiteness is checked."""
    named = [*module.named_parameters(), *module.named_buffers()]
    weights = [t.detach().double().reshape(-1) for _, t in named]
    flat = torch.cat(weights).cpu()
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    local = torch.stack([flat.sum(), (flat * positions.sqrt()).sum()])
    gathered = [local]
    if world.distributed:
        gathered = [torch.empty_like(local) for _ in range(world.size)]
        dist.all_gather(gathered, local)
    # Sums of float32 weights in float64 are finite exactly when every weight is; every
    # rank sees the same sums, so all of them take the extra collective, or none does.
    if not all(bool(torch.isfinite(g).all()) for g in gathered):
        parameters = sum(1 for _ in module.parameters())
        _raise_non_finite(named, parameters, world, update, step)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        sums = ", ".join(f"rank {k}: {g[0].item():.17g}" for k, g in enumerate(gathered))
        raise RanksDiverged(f"the ranks' models differ ({sums}); this is a bug, please report it")


def _raise_non_finite(
    named: list, parameters: int, world: World, update: int | None, step: int | None
) -> None:
    """Raise ``NonFiniteWeights``, with the same message on every rank, for the first
    non-finite tensor of the lowest rank that holds one (``named``: parameters, the first
    ``parameters`` of them, then buffers). Returns where none does (a checksum overflowed)."""
    first, nan = -1, 0
    for i, (_, tensor) in enumerate(named):
        if not bool(torch.isfinite(tensor).all()):
            first, nan = i, int(bool(torch.isnan(tensor).any()))
            break
    local = torch.tensor([float(first), float(nan)], dtype=torch.float64)
    found = [local]
    if world.distributed:
        found = [torch.empty_like(local) for _ in range(world.size)]
        dist.all_gather(found, local)
    ranks = [k for k, f in enumerate(found) if f[0].item() >= 0]
    if not ranks:
        return
    index, nan = int(found[ranks[0]][0].item()), bool(found[ranks[0]][1].item())
    kind = "parameter" if index < parameters else "buffer"
    where = [f"update {update}" if update is not None else None]
    where.append(f"env step {step}" if step is not None else None)
    at = ", ".join(w for w in where if w)
    on = "every rank" if len(ranks) == world.size else "rank " + ", ".join(map(str, ranks))
    raise NonFiniteWeights(
        f"{kind} {named[index][0]!r} holds {'NaN' if nan else 'infinity'}"
        f"{f' at {at}' if at else ''} (on {on}): training diverged; lower the learning rate "
        "(ppo.lr) or the gradient clip (ppo.max_grad_norm), or check the env's rewards and "
        "observations for non-finite values"
    )


def gather_batches(x: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's ``x`` (same shape everywhere) concatenated along dim 0 in rank order
    (on every rank): e.g. all ranks' rollouts for the compression guards."""
    if not world.distributed:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world.size)]
    dist.all_gather(parts, x)
    return torch.cat(parts)


def broadcast_object(obj, world: World, src: int = 0):
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. a reduction plan)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a one-machine job's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PeerStopped(RuntimeError):
    """Another rank left the job at a barrier (it reports why itself)."""


def barrier(world: World) -> None:
    """Wait for every rank. Raises ``PeerStopped`` if one left the job instead (e.g. rank 0
    found the run directory busy): that rank's own message is the one to show."""
    if world.distributed:
        try:
            dist.barrier()
        except RuntimeError as err:  # gloo: "Connection closed by peer"
            raise PeerStopped(f"rank {world.rank}: another rank left the job ({err})") from None


def shutdown(world: World) -> None:
    """Leave the process group (at the end of training)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
