"""Process groups under torchrun, and the few collectives the trainer needs.

:func:`setup` reads what ``torchrun`` exports to each worker (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, the rendezvous address, ``TORCHELASTIC_RESTART_COUNT``, ``TORCHELASTIC_RUN_ID``),
binds the worker to its GPU (``cuda:LOCAL_RANK``) when training on CUDA and initialises the
default process group: NCCL on CUDA, gloo on CPU, or ``train.dist_backend``. A process group the
caller initialised already is used as it is (and left alone at the end). Without torchrun's
variables nothing is initialised and every helper here acts for a single process.

Agreement: decisions every rank must take together (skip a step, stop for the time budget,
which checkpoint to resume) are made from all-reduced or broadcast values, never from what one
rank sees alone, so no rank can leave the loop while another waits in a collective.

Fault injection (tests only): ``DITO_FAST_FAULT="<point>:<step>[:<rank>]"`` (comma-separated for
several) makes :func:`fault_point` end the process with ``os._exit`` at that point of that step,
on the first attempt of a torchrun job only (``TORCHELASTIC_RESTART_COUNT`` 0), so the restarted
workers run through. Points: ``after_step`` (the step's update is done, before logging and
checkpointing) and ``checkpoint_write`` (the checkpoint files are written, the checkpoint is not
yet committed).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

FAULT_ENV = "DITO_FAST_FAULT"
FAULT_EXIT_CODE = 17
BACKENDS = ("auto", "nccl", "gloo", "mpi", "ucc")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the data-parallel workers.

    ``backend`` is None for a plain single-process run; ``owns_group`` says whether :func:`setup`
    initialised the process group (and :func:`teardown` destroys it). ``restart_count`` is
    torchrun's attempt number (0 on the first launch), ``run_id`` its job id.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False
    restart_count: int = 0
    run_id: str | None = None

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets "
                         "RANK, WORLD_SIZE and LOCAL_RANK)") from None


def launch_ranks() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from the launcher's environment, checked; None for a plain
    single process. A partial set that describes several processes (WORLD_SIZE > 1 or RANK > 0
    without the others, as some MPI/SLURM wrappers leave it) is an error: each process would
    otherwise train alone as rank 0 and write over the others' checkpoints."""
    present = [k for k in _LAUNCH_VARS if k in os.environ]
    if not present:
        return None
    if len(present) < len(_LAUNCH_VARS):
        several = ("WORLD_SIZE" in present and _env_int("WORLD_SIZE") != 1) or ("RANK" in present and _env_int("RANK") != 0)
        if several:
            missing = [k for k in _LAUNCH_VARS if k not in present]
            raise ValueError(f"{', '.join(f'{k}={os.environ[k]}' for k in present)} is set but {', '.join(missing)} "
                             "is not: launch the workers with torchrun, or set RANK, WORLD_SIZE and LOCAL_RANK "
                             "for every process")
        return None
    rank, world, local_rank = (_env_int(k) for k in _LAUNCH_VARS)
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ValueError(f"inconsistent launch environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank}: "
                         "need WORLD_SIZE >= 1, 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0")
    return rank, world, local_rank


def resolve_backend(requested: str, device_type: str) -> str:
    """"auto" -> "nccl" for CUDA devices, "gloo" otherwise; an explicit name is checked."""
    if requested not in BACKENDS:
        raise ValueError(f"train.dist_backend must be one of {'|'.join(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if requested == "nccl" and device_type != "cuda":
        raise ValueError(f"train.dist_backend 'nccl' needs a CUDA device, but training runs on {device_type}; "
                         "use 'gloo' (or 'auto')")
    if requested == "nccl" and not dist.is_nccl_available():
        raise RuntimeError("train.dist_backend 'nccl' requested but this torch build has no NCCL")
    return requested


def rank_device(name: str, local_rank: int, distributed: bool) -> torch.device:
    """The device of this worker for ``train.device`` = ``name``: "auto" is CUDA when available,
    else CPU. Under torchrun a CUDA device without an index becomes ``cuda:LOCAL_RANK``, or
    ``cuda:0`` when ``CUDA_VISIBLE_DEVICES`` leaves each process one GPU; an explicit index other
    than LOCAL_RANK with several visible GPUs is refused (it would put every worker of the node on
    that GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError as e:  # torch: "Expected one of cpu, cuda, ... device type at start of device string"
        raise ValueError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:<index> ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available (torch {torch.__version__}, "
                             f"{torch.cuda.device_count()} CUDA devices visible)")
        count = torch.cuda.device_count()
        if distributed and dev.index is None:
            if count == 1 and os.environ.get("CUDA_VISIBLE_DEVICES", "").strip():
                return torch.device("cuda", 0)  # one GPU made visible to each process
            if local_rank >= count:
                raise ValueError(f"LOCAL_RANK {local_rank} but only {count} CUDA devices are visible: start at most one "
                                 "worker per GPU (torchrun --nproc-per-node), or give each process its own GPU "
                                 "with CUDA_VISIBLE_DEVICES")
            dev = torch.device("cuda", local_rank)
        elif distributed and count > 1 and dev.index != local_rank:
            raise ValueError(f"device {name!r} for the worker with LOCAL_RANK {local_rank}: every worker of this node "
                             f"would use GPU {dev.index}; use 'cuda' (or 'auto'), and each worker takes cuda:LOCAL_RANK")
    return dev


def _restart_info() -> tuple[int, str | None]:
    count = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return count, os.environ.get("TORCHELASTIC_RUN_ID")


def _attempt_store(rank: int, world: int, restart_count: int):
    """torchrun's store (MASTER_ADDR/MASTER_PORT, as ``env://`` would connect to it) with keys
    prefixed by the restart attempt. torchrun's c10d rendezvous keeps one store for all
    attempts, so without the prefix the workers of attempt n can read the connection addresses
    that the dead workers of attempt n-1 published, and fail to connect (seen with gloo)."""
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world))
    return dist.PrefixStore(f"dito_fast/attempt_{restart_count}", store)


def setup(backend: str = "auto", device: str = "auto", timeout_minutes: float | None = None
          ) -> tuple[DistContext, torch.device]:
    """Initialise (or adopt) the default process group; returns (context, this worker's device).

    Non-zero ranks log warnings and errors only (the ``dito_fast`` logger), so a job's output
    holds one copy of each progress line.
    """
    restart_count, run_id = _restart_info()
    if dist.is_available() and dist.is_initialized():  # the caller set the group up: use it as it is
        rank, world = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        dev = rank_device(device, local_rank, True)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        ctx = DistContext(rank, world, local_rank, dist.get_backend(), False, restart_count, run_id)
    elif (ranks := launch_ranks()) is not None:
        if not dist.is_available():
            raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
        rank, world, local_rank = ranks
        dev = rank_device(device, local_rank, True)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        name = resolve_backend(backend, dev.type)
        kwargs = {}
        if name == "nccl":
            kwargs["device_id"] = dev  # eager NCCL communicator on this worker's GPU
        if timeout_minutes:
            kwargs["timeout"] = timedelta(minutes=timeout_minutes)
        # DDP imports torch._dynamo; imported while a process group exists, it keeps references to
        # the group, so destroy_process_group leaves gloo's threads running and the process can
        # abort at exit ("terminate called without an active exception"). Import it first.
        import torch._dynamo  # noqa: F401
        dist.init_process_group(backend=name, store=_attempt_store(rank, world, restart_count), rank=rank,
                                world_size=world, **kwargs)
        ctx = DistContext(rank, world, local_rank, name, True, restart_count, run_id)
        logger.debug("rank %d/%d (local %d) on %s, backend %s, attempt %d", rank, world, local_rank, dev, name,
                     restart_count)
    else:
        return DistContext(restart_count=restart_count, run_id=run_id), rank_device(device, 0, False)
    if ctx.rank != 0:
        logging.getLogger("dito_fast").setLevel(logging.WARNING)
    return ctx, dev


def teardown(ctx: DistContext, ok: bool = True) -> None:
    """Destroy the process group if :func:`setup` created it. After a failure on NCCL the group is
    left to the process exit: destroying it could wait on collectives the other ranks never join.

    Release DDP wrappers before calling this (let the function that built them return; ``train``
    also clears the frames of a failed run's traceback). A DDP reducer that outlives the group
    holds the last reference to it, and when the reducer dies it destroys the group while
    holding the GIL; gloo's destructor then joins a worker thread that may be waiting for the GIL
    to free a finished collective's tensors, and the process hangs at exit (seen in 2 of 9
    two-process runs here). As a safety net, unreachable objects (a wrapper caught in a reference
    cycle) are collected here, while the group is still registered.
    """
    if ctx.owns_group and dist.is_initialized() and (ok or ctx.backend != "nccl"):
        gc.collect()
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# collectives (no-ops for a single process)


def _device_ids(ctx: DistContext):
    return [ctx.local_rank] if ctx.backend == "nccl" else None


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier(device_ids=_device_ids(ctx))


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; small objects only)."""
    if not ctx.distributed:
        return obj
    box = [obj if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def every_rank_description(mine, failed: Exception | None, failure: str) -> list | None:
    """For the checks that every rank read the same data (each reads it itself under torchrun):
    every rank's ``mine`` (a JSON-able description), all-gathered in rank order; None in a single
    process or on the rank that ``failed`` (its own error follows: the others are told instead of
    left waiting). Where another rank failed, a ValueError ``failure.format(rank=, error=)``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if failed is not None:
        mine = {"error": f"{type(failed).__name__}: {failed}"}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if failed is not None:
        return None
    errors = [(r, d["error"]) for r, d in enumerate(every) if isinstance(d, dict) and "error" in d]
    if errors:
        raise ValueError(failure.format(rank=errors[0][0], error=errors[0][1]))
    return every


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's ``obj``, in rank order (pickled; small objects only)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_(tensor: torch.Tensor, ctx: DistContext, op=None) -> torch.Tensor:
    """In-place all-reduce (sum by default) of a tensor on this worker's device."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op)
    return tensor


def all_gather_rows(values: list[float], ctx: DistContext, device: torch.device) -> list[list[float]]:
    """The list ``values`` (same length on every rank) of every rank, in rank order."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not ctx.distributed:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


# --------------------------------------------------------------------------------------------
# replica checks (DDP: every rank must hold the same weights)


@torch.no_grad()
def replica_max_difference(module: torch.nn.Module, ctx: DistContext) -> float:
    """Largest absolute difference between any parameter or buffer of ``module`` on any rank
    and the same tensor on rank 0, by all-gathering every tensor (exact; costs a full copy of
    the model per rank, for tests and debugging). 0.0 for a single process."""
    if not ctx.distributed:
        return 0.0
    if any(hasattr(t, "to_local") for t in module.parameters()):
        raise ValueError("replica_max_difference compares replicated (DDP) models; this one is sharded (FSDP)")
    worst = 0.0
    for _, t in [*module.named_parameters(), *module.named_buffers()]:
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t)
        for p in parts[1:]:
            worst = max(worst, float((p.double() - parts[0].double()).abs().max()) if p.numel() else 0.0)
    return worst


@torch.no_grad()
def replicas_agree(module: torch.nn.Module, ctx: DistContext) -> bool:
    """Cheap check that every rank holds the same parameters: per tensor (sum, sum of squares,
    position-weighted sum) in float64, all-gathered and compared exactly."""
    if not ctx.distributed:
        return True
    sums = []
    for t in module.parameters():
        v = t.detach().reshape(-1).double()
        w = torch.arange(1, v.numel() + 1, device=v.device, dtype=torch.float64).remainder_(1021.0)
        sums += [v.sum(), v.square().sum(), (v * w).sum()]
    local = torch.stack(sums) if sums else torch.zeros(1, dtype=torch.float64, device=_param_device(module))
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return all(torch.equal(p, parts[0]) for p in parts[1:])


def _param_device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# --------------------------------------------------------------------------------------------
# test-only fault injection


def _fault_points() -> list[tuple[str, int, int | None]]:
    spec = os.environ.get(FAULT_ENV, "").strip()
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise ValueError(f"{FAULT_ENV} entries are <point>:<step>[:<rank>], got {item!r}")
        out.append((parts[0], int(parts[1]), int(parts[2]) if len(parts) == 3 else None))
    return out


def fault_point(point: str, step: int, ctx: DistContext) -> None:
    """End this process (``os._exit``) if ``DITO_FAST_FAULT`` names this point, step and rank
    (tests only; first attempt of a torchrun job only)."""
    if FAULT_ENV not in os.environ or ctx.restart_count > 0:
        return
    for name, at_step, at_rank in _fault_points():
        if name == point and at_step == step and at_rank in (None, ctx.rank):
            logger.error("fault injection (%s): rank %d exits at %s of step %d", FAULT_ENV, ctx.rank, point, step)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(FAULT_EXIT_CODE)
