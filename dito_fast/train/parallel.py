"""Data parallelism for the trainer: how a rank processes its share of the global batch, and
how the model is replicated (DDP) or sharded (FSDP2) across ranks.

Global batch semantics. ``train.batch_size`` = G is the number of samples per optimizer step
over all ranks. Rank r reads ``rank_slice(G, r, W)`` of every global batch (G/W samples when W
divides G, shares differing by one otherwise), in micro-batches of at most
``train.micro_batch_size`` samples (or ``train.grad_accum_steps`` micro-batches); the gradient is
that of the mean loss over all G samples: each micro-batch backpropagates
``sum(per-sample loss) * W / G`` and the data-parallel reduction averages over the W ranks.

Per-sample noise. The random draws of sample i of step k (times, image noise, noise-sync draws)
come from a generator seeded by (seed, k, i), i the sample's index in the global batch
(:func:`sample_seeds`). Every sample therefore sees the same noise whatever the world size, its
rank, or its micro-batch: a 2-process run and a 1-process run with the same global batch compute
the same losses and the same gradient, up to floating-point summation order.

Modes (``train.parallel``):

- ``ddp``: ``DistributedDataParallel`` around :class:`TrainStep`; bucketed all-reduces overlap
  the backward pass; gradients synchronise on the last micro-batch only (``no_sync`` before).
  Checkpoints hold full tensors (safetensors + state.pt), written by rank 0.
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on every Conv2d / Linear (the modules
  the model calls as modules; the decoder runs its residual blocks through ``forward_modulated``,
  which FSDP's module hooks would not see), and on :class:`TrainStep` as the root, which owns
  the GroupNorm weights. Parameters, gradients, optimizer state and the EMA are sharded.
  Gradients are reduce-scattered after every micro-batch (sharded accumulation, the
  memory-saving choice). Checkpoints go through torch.distributed.checkpoint (DCP), so a run can
  resume with another world size. Every rank runs the same number of forward passes: a rank
  with a smaller share pads its micro-batches with zero-weight copies of its last sample.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from ..data.sampler import mix_seed, rank_slice
from ..diffusion import flow
from ..models.dito import DiTo
from .distributed import DistContext

logger = logging.getLogger(__name__)

NOISE_TAG = 0x7E57  # separates the noise seeds from the other uses of mix_seed(seed, ...)


# --------------------------------------------------------------------------------------------
# the global batch: shares, micro-batches, per-sample seeds


def sample_seeds(seed: int, step: int, start: int, stop: int) -> list[int]:
    """Seeds of the random draws of global-batch samples ``start..stop-1`` of step ``step``
    (0-based optimizer step)."""
    return [mix_seed(seed, NOISE_TAG, step, i) for i in range(start, stop)]


def micro_batch_sizes(n: int, micro_batch_size: int = 0, grad_accum_steps: int = 1) -> list[int]:
    """Split ``n`` samples into micro-batches: ``ceil(n / micro_batch_size)`` of them when
    ``micro_batch_size`` > 0, else ``min(grad_accum_steps, n)``; sizes as equal as possible
    (larger first, differing by at most one). Their sum is ``n``."""
    if n < 1:
        raise ValueError(f"need at least one sample, got {n}")
    k = math.ceil(n / micro_batch_size) if micro_batch_size > 0 else min(max(grad_accum_steps, 1), n)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


@dataclass(frozen=True)
class BatchPlan:
    """How this rank processes its share of each global batch.

    ``start, stop``: its slice of the global batch; ``slots``: samples it runs per step
    (= its share, or the largest share when every rank must run the same passes, padding with
    zero-weight copies); ``micro``: micro-batch sizes (sum = slots); ``scale``: W / G, the factor
    on each micro-batch's summed loss.
    """

    global_batch: int
    world_size: int
    start: int
    stop: int
    slots: int
    micro: tuple[int, ...]

    @property
    def share(self) -> int:
        return self.stop - self.start

    @property
    def scale(self) -> float:
        return self.world_size / self.global_batch


def plan_batches(global_batch: int, rank: int, world_size: int, micro_batch_size: int = 0,
                 grad_accum_steps: int = 1, equal_passes: bool = False) -> BatchPlan:
    """The :class:`BatchPlan` of rank ``rank``. ``equal_passes``: every rank runs the same
    micro-batch sizes (FSDP, whose forward passes are collectives)."""
    start, stop = rank_slice(global_batch, rank, world_size)
    slots = math.ceil(global_batch / world_size) if equal_passes else stop - start
    return BatchPlan(global_batch, world_size, start, stop, slots,
                     tuple(micro_batch_sizes(slots, micro_batch_size, grad_accum_steps)))


def find_micro_batch(try_step: Callable[[int], None], n: int) -> int:
    """The largest micro-batch size (n, then halving) for which ``try_step(size)`` does not raise
    ``torch.OutOfMemoryError``. Raises that error if even 1 does not fit."""
    m = n
    while True:
        try:
            try_step(m)
            return m
        except torch.OutOfMemoryError:
            if m == 1:
                raise
        # outside the except block: the failed attempt's tensors are released with its traceback
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        m = (m + 1) // 2


# --------------------------------------------------------------------------------------------
# the loss as one module call


class TrainStep(nn.Module):
    """Per-sample flow-matching losses (B,) of a DiTo as one module call, so that DDP and FSDP
    see one forward per micro-batch. ``seeds`` (B ints) seed each sample's random draws."""

    def __init__(self, model: DiTo):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        z = self.model._encode(x)  # (B, c, h, w), normalised latents
        draws = flow.draw_per_sample(seeds, x.shape[1:], z.shape[1:], self.model.config.flow, device=x.device,
                                     dtype=x.dtype, latent_dtype=z.dtype)
        loss, _ = flow.flow_matching_loss(self.model.decoder, x, z, self.model.config.flow, draws=draws)
        return loss  # (B,)


# --------------------------------------------------------------------------------------------
# DDP / FSDP


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards as units: every Conv2d and Linear with parameters."""
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and any(True for _ in m.parameters())]


def fully_shard_model(module: nn.Module, root: nn.Module, ctx: DistContext, device: torch.device) -> None:
    """Apply FSDP2 to ``module``'s Conv2d/Linear units (bottom-up) and then to ``root`` (which
    holds the remaining parameters), in place, over all ranks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (ctx.world_size,))
    for unit in _fsdp_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(root, mesh=mesh)


class ParallelModel:
    """The model as the training loop sees it, for one of three modes: ``single`` (one process),
    ``ddp`` or ``fsdp`` (see the module docstring).

    ``model``: the model trained (sharded in place under FSDP); ``step``: the module holding it
    whose forward(*inputs, seeds) gives the per-sample losses (default: a DiTo's
    :class:`TrainStep`); ``step_module``: what to call (``step``, DDP-wrapped under DDP);
    ``ema_model``: the EMA copy (sharded like ``model`` under FSDP) or None.
    """

    def __init__(self, model: nn.Module, ema_model: nn.Module | None, mode: str, ctx: DistContext,
                 device: torch.device, step: nn.Module | None = None):
        if mode not in ("single", "ddp", "fsdp"):
            raise ValueError(f"unknown parallel mode {mode!r}")
        self.mode, self.ctx, self.device = mode, ctx, device
        self.model, self.ema_model = model, ema_model
        step = TrainStep(model) if step is None else step
        if mode == "fsdp":
            if ema_model is not None:
                fully_shard_model(ema_model, ema_model, ctx, device)
            fully_shard_model(model, step, ctx, device)
            self.step_module = step
        else:
            model.to(device)
            if ema_model is not None:
                ema_model.to(device)
            if mode == "ddp":
                from torch.nn.parallel import DistributedDataParallel as DDP

                # gradient_as_bucket_view: gradients live in the all-reduce buckets (no extra copy)
                self.step_module = DDP(step, device_ids=[device.index] if device.type == "cuda" else None,
                                       gradient_as_bucket_view=True)
            else:
                self.step_module = step
        self.inner = step  # the unwrapped TrainStep (no gradient synchronisation)

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    def micro_batch_context(self, last: bool):
        """Around a micro-batch's forward and backward: DDP synchronises gradients on the last
        micro-batch only; FSDP reduce-scatters every micro-batch (sharded accumulation)."""
        if self.mode == "ddp" and not last:
            return self.step_module.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm to ``max_norm``; returns the norm before clipping (a
        plain scalar tensor, the same on every rank)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.mode != "fsdp":
            # looked up at call time (tests replace it to simulate non-finite gradients)
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if isinstance(total, DTensor):
            total = total.full_tensor()  # the norm over all shards
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    # -- state ---------------------------------------------------------------------------

    def full_state_dict(self, which: str = "model", all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Full (unsharded) CPU tensors of ``which`` ("model" or "ema"). Under FSDP this is a
        collective: every rank must call it; ranks other than 0 get None unless ``all_ranks``."""
        module = self.model if which == "model" else self.ema_model
        if module is None:
            raise ValueError("no EMA model")
        if self.mode != "fsdp":
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=not all_ranks)
        sd = get_model_state_dict(module, options=opts)
        if not all_ranks:
            return sd if self.ctx.rank == 0 else None
        return {k: v.detach().cpu() for k, v in sd.items()}

    def sharded_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
        """(tensors for DCP, optimizer param groups): model, optimizer state and EMA, keyed by
        parameter name. Param groups (plain numbers) go to state.pt, so DCP holds tensors only."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        tensors = {"model": model_sd, "optim": optim_sd["state"]}
        if self.ema_model is not None:
            tensors["ema"] = get_model_state_dict(self.ema_model)
        return tensors, optim_sd["param_groups"]

    def load_sharded(self, dcp_dir: Path, optimizer: torch.optim.Optimizer, param_groups: list) -> None:
        """Load a DCP checkpoint written by :meth:`sharded_state` (any world size, any mode)."""
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

        tensors, _ = self.sharded_state(optimizer)  # templates: shapes and shardings to load into
        load_dcp(tensors, dcp_dir)
        set_state_dict(self.model, optimizer, model_state_dict=tensors["model"],
                       optim_state_dict={"state": tensors["optim"], "param_groups": param_groups})
        if self.ema_model is not None:  # load_dcp has checked that the checkpoint holds its weights
            set_model_state_dict(self.ema_model, tensors["ema"])

    def load_full_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Load ``optimizer.state_dict()`` of an unsharded run (a safetensors-format checkpoint).
        Moments saved in another layout than their parameter's (runs before the trainer kept the
        parameters contiguous had channels_last ones) take the parameter's layout: the fused AdamW
        would otherwise copy them on every step."""
        if self.mode != "fsdp":
            optimizer.load_state_dict(state)
            match_state_layout(optimizer)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # ids -> parameter names: the optimizer was built from model.parameters() in this order
        names = [n for n, _ in self.model.named_parameters()]
        by_name = {"state": {names[i]: s for i, s in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor of ``optimizer`` (same shape as its parameter, e.g.
    Adam's moments) its parameter's strides, copying only those that differ."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for key, value in st.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape and value.stride() != p.stride():
                    st[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


# --------------------------------------------------------------------------------------------
# DCP I/O with a restricted reader


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` accepting only DCP's own metadata classes, torch sizes/dtypes/
    layouts and plain containers, each named exactly (DCP's reader uses plain ``pickle.load``). A
    dotted name is refused whatever its module: pickle resolves ``a.b`` by attribute lookup, so
    ``(<an allowed module>, "os.system")`` would reach any function that module imported."""

    _ALLOWED = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                *(("torch.distributed.checkpoint.metadata", n) for n in (
                    "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
                    "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
                *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
                *(("builtins", n) for n in ("set", "frozenset", "slice", "tuple", "list", "dict", "int", "float", "str",
                                            "bool", "bytes"))}

    def find_class(self, module: str, name: str):
        if "." not in name:
            if (module, name) in self._ALLOWED:
                return super().find_class(module, name)
            if module == "torch":
                obj = getattr(torch, name, None)
                if name == "Size" or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    return obj
        raise pickle.UnpicklingError(f"DCP metadata refers to {module}.{name}, which a checkpoint should not hold")


def _safe_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            with open(Path(self.path) / ".metadata", "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            # An entry stored as bytes is read back with torch.load(weights_only=False), i.e.
            # unpickled; the trainer stores tensors only (sharded_state), so none is accepted.
            entries = getattr(metadata, "state_dict_metadata", None)
            if not isinstance(entries, dict):
                raise pickle.UnpicklingError("the metadata holds no state_dict_metadata table")
            not_tensors = [k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata)]
            if not_tensors:
                raise pickle.UnpicklingError(f"entries {not_tensors[:3]} are stored as pickled objects, not tensors "
                                             "(dito_fast checkpoints hold tensors only, and unpickling runs code)")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def save_dcp(tensors: dict, path: Path) -> None:
    """torch.distributed.checkpoint.save of a nested dict of tensors/DTensors into ``path``
    (collective under a process group: every rank writes its shards, rank 0 the metadata)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_single_process():
        dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(path)), no_dist=not _dist_ready())


def load_dcp(tensors: dict, path: Path) -> None:
    """Fill ``tensors`` (templates from the current model: shapes and shardings) in place from the
    DCP checkpoint at ``path``, resharding as needed."""
    import torch.distributed.checkpoint as dcp

    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"not a DCP checkpoint (no .metadata): {path}")
    from torch.distributed.checkpoint.api import CheckpointException

    reader = _safe_reader(path)
    try:  # checked here too, so a refused file gives this error rather than DCP's wrapped one
        metadata = reader.read_metadata()
    except (pickle.UnpicklingError, EOFError) as e:
        raise ValueError(f"refusing DCP checkpoint {path}: {e}") from None
    missing = sorted(set(flat_dict(tensors)) - set(metadata.state_dict_metadata))
    if missing:
        groups = sorted({k.split(".", 1)[0] for k in missing})
        raise ValueError(f"DCP checkpoint {path} lacks {len(missing)} of the tensors this model needs (in "
                         f"{', '.join(groups)}; e.g. {missing[0]}): written for another model configuration"
                         + (", or by a run without EMA (train.ema_decay=0)" if groups == ["ema"] else ""))
    try:
        with _quiet_single_process():
            dcp.load(tensors, storage_reader=reader, no_dist=not _dist_ready())
    except CheckpointException as e:  # a BaseException: it would pass every `except Exception`
        first = next(iter(e.failures.values()), e) if hasattr(e, "failures") else e
        raise ValueError(f"cannot load DCP checkpoint {path}: {type(first).__name__}: {first}") from None


def flat_dict(tree: dict, prefix: str = "") -> dict:
    """A nested dict flattened to {"a.b.c": leaf} (DCP's keys for a nested dict of tensors)."""
    out = {}
    for k, v in tree.items():
        out.update(flat_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
