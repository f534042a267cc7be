"""Sampler study: image error vs number of network evaluations (NFE) for each sampler/schedule.

On a trained model and the demo's held-out evaluation set (the 16 crops of the held-out
photographs, dito_fast/demo.py), every setting decodes the same latents from the same initial
noise (seed 0); we report the mean per-image PSNR against

- the converged ODE solution: Heun with ``--ref-steps`` (200) uniform steps from that noise
  (checked against Heun with half as many steps), i.e. how well the sampler solves the ODE;
- the ground-truth image, i.e. what a user sees.

``sampler="auto"`` (dito_fast.decode.AUTO_SETTING) is the fewest-NFE setting whose PSNR to the
converged solution is at least that of 50-step uniform Euler, the paper's sampler. The script
also measures the decoder's receptive field (dito_fast.decode.receptive_field) for the trained
model and for randomly initialised dito-tiny and dito-S, which sets the default tile overlap.

Run (2-3 minutes on one thread for the demo's 32x32 model: 135 s recorded in
benchmarks/results/sampler_study.md):

    python benchmarks/sampler_study.py /path/to/trained/model --out benchmarks/results/sampler_study.md

The model is a directory written by ``DiTo.save_pretrained`` (e.g. the ``model/`` folder of
``dito-fast demo``). Writes the markdown table and a JSON file next to it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import time
from pathlib import Path

import torch

from dito_fast import DiTo
from dito_fast.decode import fast_decode, receptive_field
from dito_fast.diffusion import samplers
from dito_fast.eval.metrics import psnr

SCHEDULES = ["uniform", "shifted:0.5", "shifted:0.3", "edm"]
NFES = [4, 6, 8, 10, 12, 16]
SAMPLERS = ["euler", "heun", "ab2", "ab3", "dpmpp_2m"]
EXTRA = [("euler", "uniform", 25), ("euler", "uniform", 50)]  # the paper's setting and half of it


def eval_images(num: int) -> tuple[torch.Tensor, str]:
    """Up to ``num`` of the demo's held-out evaluation images: the crops of the held-out
    photographs, or (without scikit-image, which bundles them) its unseen synthetic images; and
    what they are, for the report."""
    from dito_fast import demo
    from dito_fast.data import builtin_split
    from dito_fast.data.builtin import PhotoCrops
    from dito_fast.train.trainer import _mix_seed

    seed = demo.DEMO_SETTINGS["train.seed"]
    _, val = builtin_split(demo.EVAL_IMAGE_SIZE, 1, seed=seed, val_seed=_mix_seed(seed, 0xD3140) % 2**31,
                           num_val=demo.EVAL_PHOTOS + demo.EVAL_SYNTHETIC)
    first = val.datasets[0]
    if isinstance(first, PhotoCrops):
        images, label = [first[i] for i in range(min(num, len(first)))], "held-out photograph crops"
    else:
        images, label = [first[i] for i in range(min(num, len(first)))], "unseen synthetic images"
        print("scikit-image is not installed: the study runs on the demo's synthetic images", flush=True)
    return torch.stack(images), label


def steps_for(sampler: str, nfe: int) -> int | None:
    """Steps giving exactly ``nfe`` evaluations (Heun: odd NFE only, use the one below)."""
    if sampler == "heun":
        return (nfe + 1) // 2 if nfe % 2 else nfe // 2
    return nfe


def git_commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True).stdout.strip()
        return rev.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="trained model directory (config.json + model.safetensors)")
    p.add_argument("--out", default="sampler_study.md",
                   help="markdown file to write (its JSON beside it); the committed study is "
                        "benchmarks/results/sampler_study.md, replaced only when named here")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--ref-steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-receptive-field", action="store_true")
    p.add_argument("--from-json", default=None, help="only re-render the markdown from a saved JSON result")
    args = p.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows = saved["rows"]
        euler50 = next(r for r in rows if (r["sampler"], r["schedule"], r["steps"]) == ("euler", "uniform", 50))
        best = min((r for r in rows if r["psnr_ref"] >= euler50["psnr_ref"]), key=lambda r: (r["nfe"], -r["psnr_ref"]))
        write_report(Path(args.out), rows, euler50, best, saved["receptive_field_px"], saved["meta"])
        return 0
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    model = DiTo.from_pretrained(args.model, dtype=torch.float32)  # (eval mode) a half-precision save too
    weights_sha = hashlib.sha256((Path(args.model) / "model.safetensors").read_bytes()).hexdigest()[:12]
    x, images_label = eval_images(args.images)
    with torch.inference_mode():
        z = model.encode(x)

    def decode(sampler, schedule, steps):
        return fast_decode(model, z, sampler=sampler, schedule=schedule, steps=steps, seed=args.seed, output="float")

    ref = decode("heun", "uniform", args.ref_steps)
    half = decode("heun", "uniform", args.ref_steps // 2)
    ref_check = float(psnr(half, ref).mean())
    ref_gt = float(psnr(ref, x).mean())
    print(f"reference: Heun {args.ref_steps} steps; Heun {args.ref_steps // 2} vs it: {ref_check:.2f} dB; "
          f"vs ground truth {ref_gt:.2f} dB", flush=True)

    rows = []
    settings = [(s, sch, steps_for(s, n)) for s in SAMPLERS for sch in SCHEDULES for n in NFES] + EXTRA
    for sampler, schedule, steps in settings:
        out = decode(sampler, schedule, steps)
        row = {"sampler": sampler, "schedule": schedule, "steps": steps, "nfe": samplers.nfe(sampler, steps),
               "psnr_ref": float(psnr(out, ref).mean()), "psnr_gt": float(psnr(out, x).mean())}
        rows.append(row)
        print(f"{sampler:9s} {schedule:12s} steps {steps:3d} NFE {row['nfe']:3d}: {row['psnr_ref']:6.2f} dB to "
              f"converged, {row['psnr_gt']:6.2f} dB to ground truth", flush=True)

    euler50 = next(r for r in rows if r["sampler"] == "euler" and r["schedule"] == "uniform" and r["steps"] == 50)
    ok = [r for r in rows if r["psnr_ref"] >= euler50["psnr_ref"]]
    best = min(ok, key=lambda r: (r["nfe"], -r["psnr_ref"])) if ok else None

    rf = {}
    if not args.skip_receptive_field:
        rf["trained " + model.config.name] = receptive_field(model.decoder, model.latent_channels, size=128)
        for preset in ("dito-tiny", "dito-S"):
            torch.manual_seed(0)
            m = DiTo.from_preset(preset).eval()
            torch.nn.init.normal_(m.decoder.conv_out.weight, std=0.05)  # default init outputs exactly 0
            rf["random-init " + preset] = receptive_field(m.decoder, m.latent_channels, size=192)

    meta = {"model": str(args.model), "model_name": model.config.name, "weights_sha256": weights_sha,
            "objective": model.config.flow.objective, "images": int(x.shape[0]), "image_size": int(x.shape[-1]),
            "images_label": images_label,
            "seed": args.seed, "reference": f"heun {args.ref_steps} uniform", "reference_check_db": ref_check,
            "reference_gt_db": ref_gt, "commit": git_commit(), "torch": torch.__version__, "threads": args.threads,
            "seconds": round(time.perf_counter() - t_start, 1)}
    write_report(Path(args.out), rows, euler50, best, rf, meta)
    print(f"wrote {args.out}; fewest NFE at least as accurate as Euler-50: "
          + (f"{best['sampler']} {best['schedule']} {best['steps']} steps ({best['nfe']} NFE)" if best else "none"))
    return 0


def write_report(path: Path, rows, euler50, best, rf, meta) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows, "receptive_field_px": rf}, indent=2))
    nfes = NFES
    lines = [
        "# Sampler study: PSNR vs NFE",
        "",
        f"Produced by `benchmarks/sampler_study.py` at commit {meta['commit']} (torch {meta['torch']}, "
        f"{meta['threads']} thread, {meta['seconds']:.0f} s).",
        f"Model: `{meta['model']}` ({meta['model_name']}, {meta['objective']} objective, "
        f"model.safetensors sha256 {meta['weights_sha256']}...).",
        f"Images: the demo's {meta['images']} {meta.get('images_label', 'held-out photograph crops')} "
        f"({meta['image_size']}x{meta['image_size']}); "
        f"initial noise seed {meta['seed']}, the same for every setting.",
        f"Converged solution: {meta['reference']} steps (its half-step run agrees to "
        f"{meta['reference_check_db']:.1f} dB; it is {meta['reference_gt_db']:.2f} dB from the ground truth).",
        "",
        "Each cell: mean per-image PSNR (dB) to the converged solution / to the ground truth. Heun's NFE is "
        "2 steps - 1 (odd): its column NFE n holds n - 1 evaluations.",
        "",
        "| sampler | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
        "|---|---|" + "---|" * len(nfes),
    ]
    for sampler in SAMPLERS:
        for schedule in SCHEDULES:
            cells = []
            for n in nfes:
                r = next((r for r in rows if r["sampler"] == sampler and r["schedule"] == schedule
                          and r["steps"] == steps_for(sampler, n)), None)
                cells.append(f"{r['psnr_ref']:.1f} / {r['psnr_gt']:.2f}" if r else "")
            lines.append(f"| {sampler} | {schedule} | " + " | ".join(cells) + " |")
    lines += ["", "Paper's setting and half of it:", "",
              "| sampler | schedule | steps | NFE | to converged | to ground truth |", "|---|---|---|---|---|---|"]
    for sampler, schedule, steps in EXTRA:
        r = next(r for r in rows if (r["sampler"], r["schedule"], r["steps"]) == (sampler, schedule, steps))
        lines.append(f"| {sampler} | {schedule} | {steps} | {r['nfe']} | {r['psnr_ref']:.2f} | {r['psnr_gt']:.2f} |")
    lines += ["", f"Euler-50 (uniform) is {euler50['psnr_ref']:.2f} dB from the converged solution."]
    if best:
        lines.append(f"Fewest NFE at least as close: **{best['sampler']}, {best['schedule']}, {best['steps']} steps "
                     f"({best['nfe']} NFE)**: {best['psnr_ref']:.2f} dB to converged, {best['psnr_gt']:.2f} dB to "
                     f"ground truth ({50 / best['nfe']:.2f}x fewer evaluations than Euler-50).")
    else:
        lines.append("No setting in the grid reaches Euler-50's accuracy with fewer NFE.")
    lines += ["", "Fewest NFE reaching Euler-50's accuracy, per sampler (any schedule):", ""]
    for sampler in SAMPLERS:
        good = [r for r in rows if r["sampler"] == sampler and r["psnr_ref"] >= euler50["psnr_ref"]]
        r = min(good, key=lambda r: (r["nfe"], -r["psnr_ref"])) if good else None
        top = max((r for r in rows if r["sampler"] == sampler and r["nfe"] <= 5), key=lambda r: r["psnr_ref"],
                  default=None)
        lines.append(f"- {sampler}: " + (f"{r['nfe']} NFE ({r['schedule']}, {r['psnr_ref']:.1f} dB)" if r else
                                         f"none up to {max(x['nfe'] for x in rows if x['sampler'] == sampler)} NFE")
                     + (f"; best with <= 5 NFE (the 10x goal): {top['psnr_ref']:.1f} dB ({top['schedule']}, "
                        f"{top['nfe']} NFE)" if top else ""))
    if rf:
        lines += ["", "## Decoder receptive field", "",
                  "Radius (pixels) beyond which |d out(centre) / d x_t| < 1e-3 of its peak "
                  "(`dito_fast.decode.receptive_field`, t = 0.5, random x_t and z):", "",
                  "| decoder | radius (px) |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rf.items()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
