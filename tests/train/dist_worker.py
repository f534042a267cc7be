"""torchrun worker for tests/train/test_torchrun.py (not a test module).

    torchrun --standalone --nproc_per_node=N tests/train/dist_worker.py OUT_DIR '{"steps": 6, ...}'

(``train.*`` overrides by name; a ``"data"`` entry holds ``data.*`` overrides, a
``"rank_overrides"`` entry ``{"1": {...}}`` overrides that only rank 1 applies.)

Initialises the gloo process group itself through ``distributed.setup`` (so ``train()`` adopts
it and leaves it alone; a bare ``init_process_group`` would hit torchrun's shared-store problem
on a restart, see ``distributed._attempt_store``), trains
the micro model of tests/conftest.py with the given ``train.*`` overrides (resuming when OUT_DIR
holds checkpoints), then all-gathers every parameter of the trained model and writes
OUT_DIR/rank<r>.json: step, images seen, world size, the largest difference between this
model's replicas, the losses.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest's micro configuration

from conftest import micro_run_config  # noqa: E402
from dito_fast.config import apply_overrides  # noqa: E402
from dito_fast.train import train  # noqa: E402
from dito_fast.train.distributed import replica_max_difference, setup, teardown  # noqa: E402


def main() -> None:
    out, overrides = Path(sys.argv[1]), json.loads(sys.argv[2])
    torch.set_num_threads(1)
    ctx, _ = setup("gloo", "cpu")
    assert dist.is_initialized() and ctx.owns_group
    overrides.update(overrides.pop("rank_overrides", {}).get(str(ctx.rank), {}))  # {"1": {"seed": 7}}: rank 1's own
    data = overrides.pop("data", {})  # data.* settings, e.g. {"source": folder}
    cfg = apply_overrides(micro_run_config(**overrides), {f"data.{k}": v for k, v in data.items()})
    result = train(cfg, out, resume=True, progress=False)
    assert dist.is_initialized()  # train() adopted the group and left it alone
    diff = replica_max_difference(result.raw_model, ctx) if overrides.get("parallel", "ddp") == "ddp" else None
    report = {"rank": ctx.rank, "world_size": result.world_size, "step": result.step,
              "images_seen": result.images_seen, "replica_max_difference": diff, "losses": result.losses}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))
    teardown(ctx)


if __name__ == "__main__":
    main()
