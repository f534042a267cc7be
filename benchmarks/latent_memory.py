"""Memory of train-dit's latent data in several processes: a folder of latent files against its pack.

Writes a folder of random 4x32x32 latents (as ``dito-fast encode`` would, in 10 class folders)
and its pack (``dito-fast pack-latents``) under ``--dir``, then, for each form, starts
``--processes`` processes together; each loads the set (``dito_fast.data.latents.load_latents``),
reads every latent once through ``LatentSet.take`` in batches of 256 (as an epoch of training
does), and reports its memory from ``/proc/self/smaps_rollup`` (Linux only): private memory is
the process's own, shared memory the page cache mapped by several (a pack's latents). Also the
drop of the machine's MemAvailable while all of them hold the set, and each one's load time.

Run: ``python benchmarks/latent_memory.py --latents 120000 --latents-per-file 120``
(~2 GB of latents; ~1 minute here). Folders of one latent per file (``--latents-per-file 1``,
as encode writes them) take longer to write and to load, not more memory.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

import torch

GIB = 2**30


def _memory() -> dict:
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:", "Shared_Clean:", "Shared_Dirty:", "Private_Clean:", "Private_Dirty:"):
                fields[parts[0][:-1]] = int(parts[1]) * 1024 / GIB
    return {"private": fields["Private_Clean"] + fields["Private_Dirty"],
            "shared": fields["Shared_Clean"] + fields["Shared_Dirty"], "rss": fields["Rss"], "pss": fields["Pss"]}


def _available() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def _worker(source: str, barrier, results) -> None:
    from dito_fast.data.latents import load_latents

    torch.set_num_threads(1)
    start = time.perf_counter()
    latents = load_latents(source, class_folders=True, progress=False)
    load_s = time.perf_counter() - start
    total = 0.0
    for lo in range(0, len(latents), 256):
        z, _ = latents.take(torch.arange(lo, min(lo + 256, len(latents))))
        total += float(z.sum())
    barrier.wait()  # every process holds the set
    results.put({"load_s": load_s, **_memory()})
    barrier.wait()  # (the parent has read MemAvailable)


def measure(source: Path, processes: int) -> dict:
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(processes + 1), ctx.Queue()
    before = _available()
    workers = [ctx.Process(target=_worker, args=(str(source), barrier, results)) for _ in range(processes)]
    for w in workers:
        w.start()
    barrier.wait()
    drop = before - _available()
    each = [results.get() for _ in workers]
    barrier.wait()
    for w in workers:
        w.join()
    return {"available_drop": drop, "each": each}


def make_folder(root: Path, n: int, per_file: int) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    for i in range(0, n, per_file):
        k = min(per_file, n - i)
        path = root / f"c{(i // per_file) % 10}" / f"{i:08d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"latent": torch.randn(k, 4, 32, 32, generator=g)}, str(path),
                  metadata={"model": "dito-B", "model_fingerprint": "0" * 16})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--latents", type=int, default=120_000)
    p.add_argument("--latents-per-file", type=int, default=120)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write the data (default: a temporary folder)")
    args = p.parse_args()
    from dito_fast.data.latents import pack_latents

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder, pack = Path(tmp) / "latents", Path(tmp) / "latents.safetensors"
        make_folder(folder, args.latents, args.latents_per_file)
        pack_latents(folder, pack, class_folders=True, progress=False)
        size = args.latents * 4 * 32 * 32 * 4 / GIB
        print(f"{args.latents} latents of 4x32x32 ({size:.2f} GiB), {args.latents_per_file} per file, "
              f"{args.processes} processes; GiB per process (private | shared), load time")
        for name, source in (("folder", folder), ("pack", pack)):
            r = measure(source, args.processes)
            rows = ", ".join(f"{e['private']:.2f} | {e['shared']:.2f}, {e['load_s']:.2f} s" for e in r["each"])
            print(f"{name:6s}: MemAvailable fell by {r['available_drop']:.2f} GiB with all loaded; each: {rows}")


if __name__ == "__main__":
    main()
