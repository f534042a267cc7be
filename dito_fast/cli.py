"""The ``dito-fast`` command: train, train-dit, export, reconstruct, encode, pack-latents, decode,
evaluate, fid, sample-dit, info, demo.

Only this module prints; the library logs through ``logging``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path

from . import config as C
from .allocator import keep_freed_memory
from .models._pretrained import model_fingerprint, model_kind
from .models.dit import DIT_PRESETS

logger = logging.getLogger("dito_fast.cli")


class UsageError(Exception):
    """A mistake in the command (arguments, paths, files): one line, exit status 2, no traceback.
    Exit status 1 is left for partial success (some inputs skipped) and a diverged training run."""


# --------------------------------------------------------------------------------------------
# helpers


def _parse_set(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UsageError(f"--set expects key=value (e.g. train.lr=2e-4), got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _check_outputs(jobs: list[tuple[Path, Path]], out: Path, overwrite: bool) -> None:
    """Refuse before writing anything when --out is a file, two inputs would write one output
    (x.png and x.jpg both give x.png), an output would replace an input (--out naming the input
    folder), or, without ``overwrite``, an output file exists already (a user's own x.png beside
    x.jpg)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {_shown(out)} is a file; it must be a folder (created if missing)")
    _check_clashes(jobs)
    inputs = {src.resolve() for src, _ in jobs}
    for src, dst in jobs:
        if dst.resolve() in inputs:
            raise UsageError(f"writing {_shown(dst)} would replace the input {_shown(dst)}: choose another --out")
    existing = [dst for _, dst in jobs if os.path.lexists(dst)]  # a dangling symlink too: writing would follow it
    if existing and not overwrite:
        shown = ", ".join(_shown(p) for p in existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise UsageError(f"{len(existing)} output file(s) exist already ({shown}): pass --overwrite to replace them, "
                         "or choose another --out")


def _check_clashes(jobs, advice: str = "rename one, or give them separately with different --out folders") -> None:
    """Refuse when two inputs would write one output (x.png and x.jpg both give x.png); the
    message ends with ``advice``."""
    seen: dict[Path, object] = {}
    for src, dst in jobs:
        if dst in seen:
            raise UsageError(f"{_shown(seen[dst])} and {_shown(src)} would both be written to {_shown(dst)}; "
                             f"{advice}")
        seen[dst] = src


def _image_jobs(inputs: list[str], out: Path, suffix: str, overwrite: bool) -> list[tuple[Path, Path]]:
    """(image file, output file) for every input: a file gives ``out/<stem><suffix>``, a folder's
    images (recursive) ``out/<path below the folder, without extension><suffix>``. A file named
    twice is taken once."""
    from .data import list_image_files

    jobs, taken = [], set()
    for inp in inputs:
        p = Path(inp)
        if p.is_dir():
            found = list_image_files(p)
            if not found:
                raise UsageError(f"no image files in folder {_shown(p)}")
            root = Path(os.path.abspath(p))  # as list_image_files forms its paths ('..' resolved)
            new = [(Path(f), out / Path(f).relative_to(root).with_suffix(suffix)) for f in found]
        elif p.is_file():
            new = [(p, out / (p.stem + suffix))]
        else:
            raise UsageError(f"input not found: {_shown(p)}")
        for src, dst in new:
            if (src.resolve(), dst) not in taken:
                taken.add((src.resolve(), dst))
                jobs.append((src, dst))
    _check_outputs(jobs, out, overwrite)
    return jobs


# where the FID network's weights come from (this package downloads nothing)
FID_WEIGHTS_NOTE = ("pytorch-fid's pt_inception-2015-12-05-6726825d.pth, from https://github.com/mseitzer/pytorch-fid/"
                    "releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth")


def _check_size(size: int | None, factor: int) -> None:
    if size is not None and (size <= 0 or size % factor):
        raise UsageError(f"--size must be a positive multiple of {factor} (the model's downsampling), got {size}")


def _shown(path) -> str:
    """A path for messages: names that are not valid UTF-8 (kept by Python as surrogates, which
    printing would refuse) with their odd bytes escaped."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _unreadable(path: Path, e: Exception, skipped: list) -> None:
    skipped.append(path)
    print(f"skipped {_shown(path)}: {_shown(str(e))}", file=sys.stderr)


def _skipped_exit(skipped: list, total: int) -> int:
    if skipped:
        print(f"{len(skipped)} of {total} inputs could not be read and were skipped", file=sys.stderr)
        return 1
    return 0


def _load_for_model(path: Path, factor: int, size: int | None):
    """Image file -> (1, 3, H, W) in [-1, 1] with H, W multiples of ``factor``: resized so the
    shorter side is ``size`` and center-cropped to size x size when ``size`` is given, otherwise
    center-cropped to the largest multiple of ``factor``."""
    from .data import ImageTransform, load_image, pil_to_tensor

    img = load_image(path)
    if size is not None:
        return ImageTransform(size, crop="center")(img)[None]
    x = pil_to_tensor(img)
    H, W = (x.shape[-2] // factor) * factor, (x.shape[-1] // factor) * factor
    if H == 0 or W == 0:  # this image is skipped, the others go on
        raise ValueError(f"image {x.shape[-1]}x{x.shape[-2]} is smaller than {factor} pixels")
    top, left = (x.shape[-2] - H) // 2, (x.shape[-1] - W) // 2
    return x[None, :, top:top + H, left:left + W]


def _load_model(directory: str, device: str):
    from .models.dito import DiTo
    from .train.distributed import rank_device

    import torch

    dev = rank_device(device, local_rank=0, distributed=False)
    # float32 whatever the saved dtype: the commands feed float32 images and latents (--dtype runs
    # decode in half precision under autocast)
    return DiTo.from_pretrained(directory, map_location=dev, dtype=torch.float32), dev


def _seed(text: str) -> int:
    """argparse type of --seed: an int torch.Generator takes (models.dito's check)."""
    from .models.dito import _check_seed

    try:
        return _check_seed(int(text))
    except TypeError:
        raise argparse.ArgumentTypeError(f"{text} is out of range [-2**63, 2**64)") from None


def _add_decode_args(p: argparse.ArgumentParser) -> None:
    from .diffusion.samplers import SAMPLERS, SCHEDULES

    p.add_argument("--steps", type=int, default=50, help="ODE steps (default 50, the paper's)")
    p.add_argument("--sampler", default="euler", choices=sorted(SAMPLERS))
    p.add_argument("--schedule", default="uniform", help=f"time grid: {', '.join(SCHEDULES)} (shifted[:shift], edm[:rho])")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise")
    p.add_argument("--device", default="auto")


# --------------------------------------------------------------------------------------------
# subcommands


# the options train and train-dit share (_add_run_args), as config keys
_RUN_FLAGS = (("data", "data.source"), ("steps", "train.steps"), ("batch_size", "train.batch_size"),
              ("lr", "train.lr"), ("device", "train.device"), ("seed", "train.seed"), ("threads", "train.threads"),
              ("parallel", "train.parallel"), ("micro_batch_size", "train.micro_batch_size"),
              ("grad_accum_steps", "train.grad_accum_steps"), ("dist_backend", "train.dist_backend"),
              ("dist_timeout", "train.dist_timeout_minutes"))


def _run_overrides(args, flags=()) -> dict:
    """--set's settings, then those the command's own flags give (``_RUN_FLAGS`` + ``flags``)."""
    overrides = _parse_set(args.set)
    for flag, key in _RUN_FLAGS + tuple(flags):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return overrides


def _run_kind(config_path: Path) -> str | None:
    """"train-dit" or "train": the command that wrote a run's (or a checkpoint's) config.json;
    None when there is none (or it is not a run's)."""
    try:
        data = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    model = data.get("model") if isinstance(data, dict) and "train" in data else None
    return {"dit": "train-dit", "dito": "train"}.get(model_kind(model))


def _saved_run_config(args) -> Path | None:
    """The config.json a resume without --config takes its settings from: the named
    checkpoint's, else the run's (--out); None when there is none (or not resuming)."""
    if args.resume is None or args.config is not None:
        return None
    named = Path(args.resume) / "config.json" if args.resume != "auto" else None
    return next((p for p in (named, Path(args.out) / "config.json") if p is not None and p.is_file()), None)


def _check_resume_path(where: Path, out: str) -> None:
    """--resume PATH: a checkpoint directory, not a missing path, a file or an exported model.
    Not checked in a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0), whose workers resume
    from the job's newest checkpoint: the one named may have been pruned since."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        return
    example = f"{out}/checkpoints/step_<N>, or --out RUN --resume for a run's latest"
    if not where.exists():
        raise UsageError(f"--resume {_shown(where)}: no such checkpoint directory (give one: {example})")
    if not where.is_dir():
        raise UsageError(f"--resume {_shown(where)} is a file, not a checkpoint directory ({example})")
    try:
        data = json.loads((where / "config.json").read_text())
    except (OSError, ValueError):
        return
    if isinstance(data, dict) and "train" not in data and model_kind(data) is not None:
        raise UsageError(f"--resume {_shown(where)} is an exported model, not a training checkpoint: resume from a "
                         f"checkpoint of its run ({example})")


def _resolve_run(args, overrides: dict, resolve):
    """The run's config from --preset, --config (resuming without it: the checkpoint's or the
    run's config.json, :func:`_saved_run_config`) and ``overrides``, by ``resolve`` (preset,
    config_file, overrides)."""
    config_file, preset = args.config, args.preset
    named = Path(args.resume) / "config.json" if args.resume not in (None, "auto") else None
    if named is not None:
        _check_resume_path(Path(args.resume), args.out)
    for path in (named, Path(args.out) / "config.json"):
        kind = _run_kind(path) if path is not None else None
        if kind not in (None, args.command):
            what = "a DiT" if kind == "train-dit" else "a tokenizer"
            raise UsageError(f"{_shown(path.parent)} holds {what} run (dito-fast {kind}), not one of dito-fast "
                             f"{args.command}'s: " + ("resume it with dito-fast " + kind if path == named else
                                                      "choose another --out"))
    if args.resume is not None and config_file is None:
        # resuming: the settings the checkpoint (or the run) was written with, plus any overrides
        saved_config = _saved_run_config(args)
        config_file = str(saved_config) if saved_config is not None else None
        if config_file is not None and preset is not None:
            saved = json.loads(Path(config_file).read_text()).get("model", {}).get("name")
            if saved != preset:
                raise UsageError(f"--preset {preset}, but the run to resume trained {saved} ({config_file})")
            preset = None  # the same model: the saved settings, exactly
        if (config_file is None and preset is None and "model.name" not in overrides
                and args.resume == "auto" and not (Path(args.out) / "checkpoints").is_dir()):
            # a mistyped --out had started a fresh dito-B run (the default) under --resume
            raise UsageError(f"nothing to resume in {args.out}: no checkpoints and no config.json there; to start a "
                             "new run there, drop --resume or name the model (--preset, --config)")
    try:
        return resolve(preset, config_file, overrides)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        raise UsageError(e.args[0] if e.args else str(e)) from None


def _train_run(args, cfg, train_fn) -> int:
    """--dry-run's config, or the run by ``train_fn`` (train or train_dit) and its summary."""
    if args.dry_run:
        print(json.dumps(C.to_dict(cfg), indent=2))
        return 0
    resume = args.resume if args.resume not in (None, "auto") else args.resume == "auto"
    result = train_fn(cfg, args.out, resume=resume, progress=None)
    if result.rank == 0:  # under torchrun: one summary for the job
        stopped = {"requested": " (stopped early on request; --resume continues)",
                   "max_minutes": " (the time budget was spent; --resume continues)"}.get(result.stopped_early, "")
        files = f", {result.skipped_files} unreadable data files skipped" if result.skipped_files else ""
        print(f"trained {result.step} steps ({result.skipped_steps} non-finite steps skipped{files}){stopped}; "
              f"model: {result.run_dir / 'model'}")
        if "val_psnr" in result.last_val:
            print(f"validation PSNR: {result.last_val['val_psnr']:.2f} dB")
        if "val_loss" in result.last_val:
            print(f"validation loss: {result.last_val['val_loss']:.4f}")
    return 0


def cmd_train(args) -> int:
    overrides = _run_overrides(args, (("image_size", "data.image_size"), ("workers", "data.workers"),
                                      ("loader", "data.loader")))
    from .train import train

    return _train_run(args, _resolve_run(args, overrides, C.resolve_run_config), train)


def cmd_train_dit(args) -> int:
    from .data.latents import latent_classes, latent_shape
    from .train.dit import resolve_dit_run_config, train_dit

    overrides = _run_overrides(args, (("class_folders", "data.class_folders"), ("tokenizer", "data.tokenizer")))
    cfg = _resolve_run(args, overrides, resolve_dit_run_config)
    # The model's latent shape and class count are the data's (those --set gives win, and the run
    # reports a mismatch); a resumed run's model that does not take these latents is refused here,
    # in the data's terms.
    c, h, w = latent_shape(cfg.data.source)
    if h != w:
        raise UsageError(f"the latents in {cfg.data.source} are {h}x{w}: a DiT here trains on square latents "
                         "(encode the images with --size)")
    classes = latent_classes(cfg.data.source, cfg.data.class_folders)
    derived = {"model.latent_channels": c, "model.latent_size": h, "model.num_classes": len(classes)}
    m = cfg.model
    if _saved_run_config(args) is not None and (m.latent_channels, m.latent_size, m.num_classes) != (c, h, len(classes)):
        raise UsageError(f"the latents in {cfg.data.source} are {c}x{h}x{w} with {len(classes)} classes"
                         f"{' (data.class_folders)' if cfg.data.class_folders else ''}, but the model to resume takes "
                         f"{m.latent_channels}x{m.latent_size}x{m.latent_size} with {m.num_classes}: resume with the "
                         "run's latents and class folders, or start a new run")
    return _train_run(args, _resolve_run(args, {**derived, **overrides}, resolve_dit_run_config), train_dit)


def cmd_export(args) -> int:
    from .train import export_checkpoint

    path = export_checkpoint(args.checkpoint, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"exported {path} to {args.out}")
    return 0


def cmd_reconstruct(args) -> int:
    import torch

    from .decode import fast_decode
    from .eval.metrics import SSIM_WINDOW, psnr, ssim
    from .eval.report import save_image

    model, dev = _load_model(args.model, args.device)
    _check_size(args.size, model.downsample_factor)
    jobs = _image_jobs(args.inputs, Path(args.out), ".png", args.overwrite)
    skipped: list = []
    for path, target in jobs:
        try:
            x = _load_for_model(path, model.downsample_factor, args.size)
        except ValueError as e:  # an unreadable or corrupt image: the others go on
            _unreadable(path, e, skipped)
            continue
        with torch.inference_mode():
            z = model.encode(x.to(dev))
        # the same ODE as model.decode (fast_decode solves it faster, with a progress bar on a terminal)
        recon = fast_decode(model, z, steps=args.steps, sampler=args.sampler, schedule=args.schedule, seed=args.seed,
                            output="float", progress=sys.stderr.isatty())
        save_image(recon[0], target)
        quality = f"PSNR {float(psnr(recon, x)):.2f} dB"
        if min(x.shape[-2:]) >= SSIM_WINDOW:
            quality += f", SSIM {float(ssim(recon, x)):.4f}"
        print(f"{_shown(path)} -> {_shown(target)}  {quality}")
    return _skipped_exit(skipped, len(jobs))


def _prefetched(fn, items: list, workers: int, depth: int):
    """(item, fn(item)) in order, ``fn`` run ahead on ``workers`` threads, at most ``depth``
    results waiting (PIL decodes with the GIL released)."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if workers <= 0:
        yield from ((item, fn(item)) for item in items)
        return
    with ThreadPoolExecutor(workers) as pool:
        waiting: deque = deque()
        for item in items:
            waiting.append((item, pool.submit(fn, item)))
            if len(waiting) >= depth:
                first, future = waiting.popleft()
                yield first, future.result()
        while waiting:
            first, future = waiting.popleft()
            yield first, future.result()


def _size_said(size: str) -> str:
    """An encode file's recorded size ("native" or a number) as the option that gives it."""
    return "no --size" if size == "native" else f"--size {size}"


def _encoded_differs(path: Path, meta: dict, shape: tuple) -> str:
    """How the file ``path`` differs from the latent file this encode would write there: one F32
    'latent' tensor of ``shape`` (None for a side the image decides), with ``meta``'s source,
    model fingerprint, size and views in its metadata (the model's name, a label, is not
    compared); "" when it does not differ. Reads the header only, and checks the file's length
    against it."""
    from .data.latents import _read_header

    try:
        with open(path, "rb") as fh:
            header, head = _read_header(fh)
            length = os.fstat(fh.fileno()).st_size
    except (OSError, ValueError) as e:  # (a folder, a dangling link, another kind of file)
        return f"cannot be read ({_shown(str(e))})"
    entry, found = header.get("latent"), header.get("__metadata__")
    if not isinstance(entry, dict) or not isinstance(found, dict):
        return "is not a latent file that encode wrote (no 'latent' tensor, or no metadata)"
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        return "has no valid data offsets for its latent"
    if len(head) + offsets[1] != length:
        return f"is {length} bytes where its header says {len(head) + offsets[1]} (cut short?)"
    if found.get("model_fingerprint") != meta["model_fingerprint"]:
        return (f"was encoded by another model ({found.get('model', '?')}, fingerprint "
                f"{found.get('model_fingerprint', 'none')}) than this one ({meta['model']}, "
                f"{meta['model_fingerprint']})")
    if found.get("source") != meta["source"]:
        return f"is the latent of {found.get('source', 'an image it does not name')}, not of {meta['source']}"
    if "size" not in found:
        return "does not record the --size it was encoded with (an older encode wrote it)"
    if found["size"] != meta["size"]:
        return f"was encoded with {_size_said(found['size'])}; this encode has {_size_said(meta['size'])}"
    if found.get("views") != meta.get("views"):
        return f"was encoded {'without' if 'views' in meta else 'with'} --flip"
    dims = entry.get("shape")
    if entry.get("dtype") != "F32" or not (isinstance(dims, list) and len(dims) == len(shape) and all(
            want is None or got == want for got, want in zip(dims, shape))):
        wanted = ", ".join("?" if d is None else str(d) for d in shape)
        return f"holds a {entry.get('dtype')} latent of shape {dims}, not F32 ({wanted})"
    return ""


def _encoded_already(jobs: list[tuple[Path, Path]], meta, shape: tuple, overwrite: bool, ctx) -> tuple[list, int]:
    """(the jobs still to encode, how many are done) for encode --skip-existing: an output file that
    exists and holds what this encode would write there (:func:`_encoded_differs`) is done. One
    that differs is re-encoded with ``overwrite``, and otherwise refused, before anything is
    written. ``meta(source)``: the metadata this encode writes for an image. Under torchrun each
    rank reads every WORLD_SIZE-th existing output's header (not all of them: 1.28 M files for
    ImageNet, on a shared file system) and the ranks pool their verdicts, so that every rank
    decides alike; ``jobs`` must be the same on every rank."""
    from .train import distributed

    mine = {i: _encoded_differs(dst, meta(src), shape) for i in range(ctx.rank, len(jobs), ctx.world_size)
            for src, dst in [jobs[i]] if os.path.lexists(dst)}
    verdicts = {i: why for part in distributed.all_gather_object(mine, ctx) for i, why in part.items()}
    todo, done, differ = [], 0, []
    for i, (src, dst) in enumerate(jobs):
        if i not in verdicts:
            todo.append((src, dst))
            continue
        why = verdicts[i]
        if not why:
            done += 1
        elif overwrite:
            todo.append((src, dst))
        else:
            differ.append(f"{_shown(dst)} {why}")
    if differ:
        more = f"; and {len(differ) - 3} more" if len(differ) > 3 else ""
        raise UsageError(f"{len(differ)} existing output file(s) differ from what this encode writes: "
                         f"{'; '.join(differ[:3])}{more}. Pass --overwrite too to re-encode them (only them), "
                         "or choose another --out")
    return todo, done


def cmd_encode(args) -> int:
    import torch

    from .models.dito import DiTo
    from .train import distributed
    from .train.checkpoint import save_safetensors

    if args.batch_size < 1 or args.workers < 0:
        raise UsageError(f"--batch-size must be >= 1 and --workers >= 0, got {args.batch_size} and {args.workers}")
    # with --skip-existing, the outputs that exist are checked below, against the model
    jobs = _image_jobs(args.inputs, Path(args.out), ".safetensors", args.overwrite or args.skip_existing)
    ctx, dev = distributed.setup(device=args.device)  # each rank encodes its share
    ok = False
    try:
        model = DiTo.from_pretrained(args.model, map_location=dev, dtype=torch.float32)
        _check_size(args.size, model.downsample_factor)
        meta = {"model": model.config.name, "model_fingerprint": model_fingerprint(model),
                "size": "native" if args.size is None else str(args.size),
                **({"views": "image,mirrored"} if args.flip else {})}
        if ctx.world_size > 1:
            # every rank's listing and output check (above) done before any rank writes, and the
            # listings alike (a folder still being filled would give the ranks overlapping shares)
            import hashlib

            names = "\0".join(str(a) for a, _ in jobs).encode("utf-8", "surrogateescape")
            listings = set(distributed.all_gather_object((len(jobs), hashlib.sha256(names).hexdigest()), ctx))
            if len(listings) > 1:
                raise UsageError(f"the ranks found different images to encode ({sorted(n for n, _ in listings)} "
                                 "images): is a folder still being written? Encode it when it is complete")
        done = 0
        if args.skip_existing:  # every rank alike, before the images are shared out
            side = None if args.size is None else args.size // model.downsample_factor
            jobs, done = _encoded_already(jobs, lambda src: {"source": _shown(src), **meta},
                                          (2 if args.flip else 1, model.latent_channels, side, side), args.overwrite,
                                          ctx)
        share = jobs[ctx.rank::ctx.world_size]
        skipped: list = []

        def load(job):
            try:
                return _load_for_model(job[0], model.downsample_factor, args.size)
            except (ValueError, FileNotFoundError) as e:  # (unusable, or removed since it was listed)
                return e

        views = 2 if args.flip else 1  # the image, and with --flip its mirror image (left-right)

        def encode(group):  # images of one size: one batch
            x = torch.cat([x for _, _, x in group])
            if args.flip:
                x = torch.stack([x, x.flip(-1)], 1).flatten(0, 1)  # image, mirror, next image, ...
            with torch.inference_mode():
                z = model.encode(x.to(dev)).cpu()
            for k, (path, target, _) in enumerate(group):
                latent = z[k * views:(k + 1) * views].contiguous()
                save_safetensors({"latent": latent}, target, metadata={"source": _shown(path), **meta})
                print(f"{_shown(path)} -> {_shown(target)}  latent {tuple(latent.shape)}")

        # image size -> [(path, target, image)]: a full group is encoded, and when batch_size
        # images wait in all (sizes that rarely repeat), the largest group is, so that at most
        # batch_size images wait (besides those read ahead)
        pending: dict = {}
        for (path, target), x in _prefetched(load, share, args.workers, args.batch_size + args.workers):
            if isinstance(x, Exception):
                _unreadable(path, x, skipped)
                continue
            pending.setdefault(tuple(x.shape), []).append((path, target, x))
            if sum(map(len, pending.values())) >= args.batch_size:
                encode(pending.pop(max(pending, key=lambda k: len(pending[k]))))
        for group in pending.values():
            encode(group)
        ok = True
    finally:
        distributed.teardown(ctx, ok)
    done_said = f"{done} already done (--skip-existing)"
    if ctx.world_size == 1:
        if args.skip_existing:
            print(f"encoded {len(share) - len(skipped)} images, {done_said}"
                  f"{f', {len(skipped)} unreadable skipped' if skipped else ''}")
        return _skipped_exit(skipped, len(share))
    # torchrun takes a worker's non-zero exit for a failure and stops the other ranks: exit 0,
    # the count said
    print(f"rank {ctx.rank}: {len(share) - len(skipped)} of its {len(share)} images encoded"
          f"{f', {len(skipped)} unreadable and skipped' if skipped else ''} ({len(jobs)} in all"
          f"{f'; {done_said}' if args.skip_existing else ''})")
    return 0


def cmd_pack_latents(args) -> int:
    from .data.latents import pack_latents

    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"--out {_shown(out)} is a folder; a pack is one file (e.g. {_shown(out)}.safetensors)")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{_shown(out)} exists (--overwrite replaces it)")
    # the temporary files of an earlier pack-latents to --out that was killed (.NAME.XXXXXXXX.tmp
    # next to it); one still running writes such a file too, so they are named, not deleted
    with contextlib.suppress(OSError):  # (a folder still to be made)
        stale = sorted((f.name, f.stat(follow_symlinks=False).st_size) for f in os.scandir(out.parent)
                       if f.name.startswith(f".{out.name}.") and f.name.endswith(".tmp"))
        if stale:
            listed = ", ".join(f"{_shown(name)} ({n / 2**30:.2f} GiB)" if n >= 2**30 else
                               f"{_shown(name)} ({n / 2**20:.1f} MiB)" for name, n in stale[:5])
            print(f"warning: {len(stale)} temporary file(s) of an earlier pack-latents to {_shown(out)}: {listed}"
                  f"{', ...' if len(stale) > 5 else ''} in {_shown(out.parent)}; a pack-latents killed before it "
                  "finished leaves its file behind: delete them unless one to this --out is running now",
                  file=sys.stderr)
    packed = pack_latents(args.folder, out, args.class_folders, progress=sys.stderr.isatty(), overwrite=args.overwrite)
    classes = f", {len(packed.classes)} classes" if args.class_folders else ", unconditional (no labels)"
    print(f"{_shown(out)}: {len(packed)} latents of {'x'.join(map(str, packed.shape))}{classes}; train with "
          f"dito-fast train-dit --data {_shown(out)}{' --class-folders' if args.class_folders else ''}")
    for name, reason in packed.skipped:
        print(f"skipped {_shown(name)}: {_shown(reason)}", file=sys.stderr)
    return _skipped_exit(packed.skipped, len(packed.skipped) + len(set(packed.names)))


def cmd_decode(args) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load

    from .data.latents import safetensors_files
    from .decode import fast_decode
    from .eval.report import save_image

    from tqdm.auto import tqdm

    model, dev = _load_model(args.model, args.device)
    fingerprint = model_fingerprint(model)
    out = Path(args.out)
    # latent file -> its images' path without the ending: a folder's files (recursive, as encode
    # writes them, symlinked folders followed) mirror their subfolders under --out, a named file
    # goes to --out itself
    bases: dict[Path, Path] = {}
    for inp in args.inputs:
        p = Path(inp)
        if p.is_dir():
            for f in safetensors_files(p):
                bases.setdefault(f, out / f.relative_to(p).with_suffix(""))
        else:
            bases.setdefault(p, out / p.stem)
    if not bases:
        raise UsageError("no .safetensors latent files given")
    files = list(bases)
    # Every file's header first: a missing or unreadable file, another model's latents, or two
    # files writing one image (a.safetensors holding 2 latents writes a_0.png and a_1.png, as
    # a_0.safetensors's one latent would) stop the command before anything is decoded.
    counts, sizes = {}, {}
    for f in files:
        shape, dtype, meta = _latent_header(f)
        if meta.get("model_fingerprint", fingerprint) != fingerprint and not args.any_model:
            raise UsageError(f"{_shown(f)} was encoded by another model ({meta.get('model', '?')}, fingerprint "
                             f"{meta['model_fingerprint']}) than {args.model} ({model.config.name}, {fingerprint}): "
                             "its decoder would give a wrong image (--any-model decodes it anyway)")
        if len(shape) != 4 or shape[0] < 1 or shape[1] != model.latent_channels or dtype not in _FLOAT_DTYPES:
            raise UsageError(f"{_shown(f)}: its latent is {dtype} {tuple(shape)}; this model decodes floating latents "
                             f"of shape (B, {model.latent_channels}, h, w), B >= 1")
        counts[f] = shape[0]
        sizes.setdefault(tuple(shape[-2:]), f)  # (the first file of each latent size)
    names = {f: [bases[f].with_name(bases[f].name + ".png")] if counts[f] == 1 else
             [bases[f].with_name(f"{bases[f].name}_{i}.png") for i in range(counts[f])] for f in files}
    _check_outputs([(f, name) for f in files for name in names[f]], out, args.overwrite)
    progress = not args.no_progress and sys.stderr.isatty()  # no bars in a redirected log
    options = dict(_fast_decode_options(args), seed=args.seed, device=dev, progress=progress)
    # the settings, and the tiles for every latent size, before any image is written (a tile that
    # did not fit the third file's size had stopped the command after writing two files' images,
    # and the rerun then refused those as existing outputs)
    from .decode import _check_tile, resolve_settings

    try:
        resolve_settings(options["sampler"], options["steps"], options["schedule"])
    except ValueError as e:
        raise UsageError(str(e)) from None
    f_ = model.latent_factor
    for size, first in sizes.items():
        try:
            _check_tile(options["tile"], options["tile_overlap"], options["tile_passes"], model.downsample_factor,
                        size[0] * f_, size[1] * f_)
        except ValueError as e:
            raise UsageError(f"{_shown(first)} (and any latent of its size): {e}") from None
    for f in tqdm(files, desc="files", unit="file", disable=not progress or len(files) == 1):
        try:  # from bytes: a path that is not valid UTF-8 is fine too
            latent = load(f.read_bytes())["latent"]
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read latent file {_shown(f)}: {e}") from None
        try:
            images = fast_decode(model, latent, **options)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{_shown(f)}: {e}") from None
        for img, name in zip(images, names[f]):
            save_image(img.float() / 127.5 - 1, name)  # (atomic; creates the folder)
            tqdm.write(f"{_shown(f)} -> {_shown(name)}", file=sys.stdout)
    return 0


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names


def _latent_header(path: Path) -> tuple[list, str, dict]:
    """(shape and dtype of the 'latent' tensor, metadata) from a safetensors file's header alone."""
    if not path.is_file():
        raise UsageError(f"latent file not found: {_shown(path)}")
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 2 <= n <= 100_000_000:  # safetensors' own limit on the header
                raise ValueError(f"header length {n} is not that of a safetensors file")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as e:  # json and UTF-8 decode errors are ValueErrors
        raise UsageError(f"cannot read latent file {_shown(path)}: {e}") from None
    if not isinstance(header.get("latent"), dict):
        from .data.latents import PACK_FORMAT

        if (header.get("__metadata__") or {}).get("format") == PACK_FORMAT:
            raise UsageError(f"{_shown(path)} is a latent pack (train-dit's data), not latent files: decode the "
                             "folder it was packed from")
        keys = sorted(k for k in header if k != "__metadata__")
        raise UsageError(f"{_shown(path)} has no 'latent' tensor (keys: {keys})")
    shape = header["latent"].get("shape")
    shape = [d for d in shape if isinstance(d, int)] if isinstance(shape, list) else []
    return shape, str(header["latent"].get("dtype")), header.get("__metadata__") or {}


def _fast_decode_options(args) -> dict:
    """fast_decode's keyword arguments from _add_fast_decode_args's options (but seed, device and
    progress, which each command sets)."""
    import torch

    return dict(steps=args.steps, sampler=args.sampler, schedule=args.schedule,
                dtype=None if args.dtype is None else getattr(torch, args.dtype), max_batch=args.max_batch,
                tile=args.tile, tile_overlap=args.tile_overlap, tile_passes=args.tile_passes,
                compile=args.compile, cuda_graph={"auto": "auto", "on": True, "off": False}[args.cuda_graph],
                channels_last={"on": True, "off": False}.get(args.channels_last, "auto"))


def _add_image_set_args(p: argparse.ArgumentParser, batch_size: int, size_required: bool) -> None:
    """The image-set options of evaluate and fid (eval.evaluate.image_batches and the FID network)."""
    p.add_argument("--size", type=int, required=size_required, default=None,
                   help="resize the shorter side to this and center-crop (images are on 8-bit levels)"
                        + ("" if size_required else "; needed when a side is images"))
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    p.add_argument("--limit", type=int, default=None,
                   help="the first N files of a folder only (unreadable ones count), or N of builtin/synthetic's "
                        "images (default 64)")
    p.add_argument("--workers", type=int, default=0, help="image-reading processes (default 0: in this one)")
    p.add_argument("--fid-weights", default=None,
                   help=f"Inception weights: {FID_WEIGHTS_NOTE}, or a .safetensors copy; nothing is downloaded")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: minutes a rank waits for the others in a collective (default: the backend's)")


def _add_fast_decode_args(p: argparse.ArgumentParser) -> None:
    """The options of dito_fast.fast_decode (see its docstring)."""
    from .diffusion.samplers import SAMPLERS

    p.add_argument("--sampler", default="auto", choices=["auto", *sorted(SAMPLERS)],
                   help="ODE solver; auto: the fewest steps as accurate as the paper's 50 Euler steps")
    p.add_argument("--steps", type=int, default=None, help="ODE steps (default: auto's, or 50 for a named sampler)")
    p.add_argument("--schedule", default=None,
                   help="time grid: uniform, shifted[:shift], edm[:rho] (default: auto's, or uniform)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initial noise")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="compute dtype (half precision: autocast, NaN guard falls back to float32)")
    p.add_argument("--max-batch", type=int, default=None, help="decode at most this many latents at once")
    p.add_argument("--tile", type=int, default=None, help="decode in overlapping tiles of this many pixels")
    p.add_argument("--tile-overlap", type=int, default=None, help="tile overlap in pixels (default 96)")
    p.add_argument("--tile-passes", type=int, default=1, choices=[1, 2],
                   help="2: image-wide GroupNorm statistics for tiles (twice the cost)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (slow first call)")
    p.add_argument("--cuda-graph", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                   help="UNet memory format (auto: channels_last on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_evaluate(args) -> int:
    from tqdm.auto import tqdm

    from .eval.evaluate import NoImagesError, evaluate_reconstruction, image_batches
    from .eval.fid import FeatureStats, InceptionFeatures
    from .eval.lpips import LPIPS
    from .models.dito import DiTo
    from .train import distributed
    from .train.checkpoint import atomic_write_json

    import torch

    if (args.fid_reference or args.save_stats) and not args.fid_weights:
        raise UsageError(f"--fid-reference and --save-stats need --fid-weights (the features are Inception's: "
                         f"{FID_WEIGHTS_NOTE})")
    if args.save_stats and args.fid_reference:
        raise UsageError("--save-stats writes the originals' statistics, which --fid-reference replaces: "
                         "give one of them")
    if args.lpips and args.size < 16:
        raise UsageError(f"--lpips needs images of at least 16x16 (VGG16's four pools), got --size {args.size}")
    for flag, out in (("--json", args.json), ("--save-stats", args.save_stats)):
        if out is not None:  # before hours of decoding, not after
            _check_output_file(flag, Path(out), args.overwrite)
    if args.save_images:
        folder = Path(args.save_images)
        if folder.exists() and not folder.is_dir():
            raise UsageError(f"--save-images {_shown(folder)} is a file; give a folder")
        if Path(args.data).is_dir() and folder.resolve().is_relative_to(Path(args.data).resolve()):
            raise UsageError(f"--save-images {_shown(folder)} is inside the data folder {_shown(args.data)}")
    ctx, dev = distributed.setup(device=args.device, timeout_minutes=args.dist_timeout)
    ok = False
    try:
        model = DiTo.from_pretrained(args.model, map_location=dev, dtype=torch.float32)
        _check_size(args.size, model.downsample_factor)
        features = InceptionFeatures.from_file(args.fid_weights, map_location=dev) if args.fid_weights else None
        reference = FeatureStats.load(args.fid_reference) if args.fid_reference else None
        info = {"network": features.fingerprint(), "size": str(args.size)} if features is not None else {}
        if reference is not None:
            _check_statistics(reference, info, args.fid_reference)
        lpips = LPIPS.from_files(*args.lpips, map_location=dev) if args.lpips else None
        skipped: list = []
        try:
            batches = image_batches(args.data, args.size, args.batch_size, limit=args.limit, workers=args.workers,
                                    skipped=skipped, rank=ctx.rank, world_size=ctx.world_size)
        except (ValueError, OSError) as e:
            raise UsageError(str(e)) from None
        save, problem = None, None
        if args.save_images:
            try:
                save = _reconstruction_writer(Path(args.save_images), batches, args.overwrite)
            except UsageError as e:
                problem = str(e)
        # every rank checked its own files: all stop, or all go on (a rank that failed alone
        # would leave the others waiting, and a late rank would find the early ones' files)
        problems = [p for p in distributed.all_gather_object(problem, ctx) if p]
        if problems:
            raise UsageError(problems[0])
        if save is not None and ctx.is_main and any(Path(args.save_images).glob("*")):
            print(f"note: {_shown(args.save_images)} is not empty; files this run does not write stay there",
                  file=sys.stderr)
        progress = ctx.is_main and not args.no_progress and sys.stderr.isatty()
        report = None
        with tqdm(desc="evaluate" if ctx.world_size == 1 else "evaluate (rank 0's share)", unit="image",
                  total=len(batches), disable=not progress) as bar:
            batches.progress = bar
            try:
                report, stats = evaluate_reconstruction(model, batches, features=features, reference=reference,
                                                        lpips=lpips, seed=args.seed, progress=bar, ctx=ctx,
                                                        on_batch=save, **_fast_decode_options(args))
            except NoImagesError:  # raised on every rank alike, after the gathers
                pass
        skipped = sorted(p for part in distributed.all_gather_object(skipped, ctx) for p in part)
        ok = True
    finally:
        distributed.teardown(ctx, ok)
    if not ctx.is_main:
        return 0 if report is not None else 2
    if report is None:
        raise ValueError(f"no readable images: all {len(skipped)} were skipped" if skipped else
                         f"no images in {args.data}")
    report.skipped = [_shown(Path(p)) for p in skipped]
    report.settings.update(data=_shown(args.data), size=args.size, limit=args.limit,
                           fid_reference=args.fid_reference and _shown(args.fid_reference))
    quality = f"PSNR {report.psnr:.2f} dB"
    if report.ssim is not None:
        quality += f", SSIM {report.ssim:.4f}"
    if report.lpips is not None:
        quality += f", LPIPS {report.lpips:.4f}"
    if report.rfid is not None:
        quality += f", rFID {report.rfid:.3f}"
    exact = f"; {report.exact_images} reconstructed exactly (infinite PSNR)" if report.exact_images else ""
    print(f"{report.num_images} image{'s' if report.num_images != 1 else ''}: {quality} ({report.seconds:.1f} s)"
          f"{exact}")
    if args.json:
        atomic_write_json(report.to_dict(), args.json)
        print(f"report: {args.json}")
    status = 0
    if args.save_stats and stats is not None:
        if stats.n < 2:
            print(f"feature statistics not written: a covariance needs at least 2 images, have {stats.n}",
                  file=sys.stderr)
            status = 1
        else:
            stats.info = dict(info)
            stats.save(args.save_stats)
            print(f"feature statistics of the originals: {args.save_stats}")
    status = max(status, _skipped_exit(skipped, report.num_images + len(skipped)))
    # torchrun takes a worker's non-zero exit for a failure (and with --max-restarts reruns the
    # whole job): a partial evaluation, said above, exits 0 there
    return 0 if ctx.distributed else status


def cmd_fid(args) -> int:
    from tqdm.auto import tqdm

    from .data.latents import is_latent_pack
    from .eval.evaluate import image_batches, image_set_stats
    from .eval.fid import FID_DIM, FeatureStats, InceptionFeatures, comparability, frechet_distance
    from .train import distributed

    sides = (args.source, args.reference)
    given = [_statistics_file(name) for name in sides]
    if args.save_stats is not None:
        if given[0]:
            raise UsageError("--save-stats writes the statistics of SOURCE's images, but SOURCE is a statistics file")
        _check_output_file("--save-stats", Path(args.save_stats), args.overwrite)
    loaded = {}
    for k, name in enumerate(sides):  # before any image is read
        if given[k]:
            if is_latent_pack(name):
                raise UsageError(f"{_shown(name)} is a latent pack (dito-fast pack-latents), not FID statistics or "
                                 "images: FID compares images; decode latents into images first (dito-fast decode), "
                                 "or give an image folder or a statistics file")
            loaded[k] = FeatureStats.load(name)
            if loaded[k].dim != FID_DIM:
                raise UsageError(f"{_shown(name)}: statistics of {loaded[k].dim}-dimensional features, the FID "
                                 f"network's are {FID_DIM}-dimensional")
    if not all(given):
        missing = [flag for flag, v in (("--fid-weights", args.fid_weights), ("--size", args.size)) if v is None]
        if missing:
            raise UsageError(f"reading images needs {' and '.join(missing)}" + (
                f" ({FID_WEIGHTS_NOTE})" if args.fid_weights is None else ""))
    ctx, dev = distributed.setup(device=args.device, timeout_minutes=args.dist_timeout)
    ok = False
    try:
        skipped: list = []
        sets = {}
        for k, name in enumerate(sides):  # both sides checked before either is read (and the network loaded)
            if not given[k]:
                try:
                    sets[k] = image_batches(name, args.size, args.batch_size, limit=args.limit, workers=args.workers,
                                            skipped=skipped, rank=ctx.rank, world_size=ctx.world_size)
                except (ValueError, OSError) as e:
                    raise UsageError(str(e)) from None
        features = InceptionFeatures.from_file(args.fid_weights, map_location=dev) if not all(given) else None
        info = {"network": features.fingerprint(), "size": str(args.size)} if features is not None else {}
        for k, name in enumerate(sides):
            if given[k]:
                _check_statistics(loaded[k], info, name)
        both = []
        for k, name in enumerate(sides):
            if given[k]:
                both.append(loaded[k])
                continue
            batches = sets[k]
            with tqdm(desc=_shown(name), unit="image", total=len(batches),
                      disable=not (ctx.is_main and not args.no_progress and sys.stderr.isatty())) as bar:
                batches.progress = bar
                both.append(image_set_stats(batches, features, progress=bar, ctx=ctx))
                both[-1].info = dict(info)
        skipped = sorted(p for part in distributed.all_gather_object(skipped, ctx) for p in part)
        ok = True
    finally:
        distributed.teardown(ctx, ok)
    if not ctx.is_main:
        return 0
    for k, name in enumerate(sides):
        if not given[k] and both[k].n < 2:
            raise ValueError(f"{_shown(name)}: {both[k].n} readable image(s); a covariance needs at least 2")
    if all(given):
        errors, warnings = comparability(both[0].info, both[1].info, tuple(_shown(n) for n in sides))
        if errors:
            raise UsageError(errors[0] + ": their FID would mean nothing")
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
    fid = frechet_distance(both[0].mean, both[0].cov, both[1].mean, both[1].cov)
    print(f"FID {fid:.4f} ({' vs '.join(str(st.n) if st.n else '?' for st in both)} images)")
    known = [st.n for st in both if st.n]
    if known and min(known) < 2048:
        print("fewer than 2048 images on a side: the covariances are singular and the value is biased high "
              "(papers use 50000)", file=sys.stderr)
    if args.save_stats is not None:
        both[0].save(args.save_stats)
        print(f"feature statistics of {_shown(args.source)}: {args.save_stats}")
    status = _skipped_exit(skipped, sum(st.n for k, st in enumerate(both) if not given[k]) + len(skipped))
    return 0 if ctx.distributed else status


def _check_statistics(stats, info: dict, name) -> None:
    """Statistics read from ``name`` against the features this run makes (``info``): another
    network's are refused, another image size is warned of."""
    from .eval.fid import comparability

    errors, warnings = comparability(stats.info, info, (_shown(name), "this run's features"))
    if errors:
        raise UsageError(errors[0] + " (--fid-weights): their FID would mean nothing")
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _statistics_file(name: str) -> bool:
    """Whether a fid argument names a statistics file (an existing file) rather than images; a
    missing .npz/.safetensors is a mistyped statistics file, not an unknown image source."""
    if Path(name).is_file():
        return True
    if Path(name).suffix in (".npz", ".safetensors") and not Path(name).is_dir():  # (a folder so named: images)
        raise UsageError(f"no such statistics file: {_shown(name)}")
    return False


def _reconstruction_writer(folder: Path, batches, overwrite: bool):
    """on_batch for evaluate --save-images: each reconstruction as folder/<name>.png, after
    checking that no two images of the set share a name and that none of this rank's files would
    be replaced (without --overwrite)."""
    from .eval.report import save_image

    targets = {i: folder / f"{name}.png" for i, name in batches.names().items()}
    _check_clashes(((batches.source(i), target) for i, target in targets.items()),  # a.jpg and a.png in one folder
                   "rename one (--save-images names each image after its file, without the ending)")
    for i in batches.share:
        if not overwrite and os.path.lexists(targets[i]):
            raise UsageError(f"--save-images: {_shown(targets[i])} exists already (--overwrite replaces it)")

    def write(indices, originals, reconstructions):
        for i, image in zip(indices, reconstructions):
            save_image(image, targets[i])  # (atomic; creates the folders)

    return write


def _check_output_file(flag: str, out: Path, overwrite: bool) -> None:
    """An output file that can be written: not a folder, not an existing file without
    --overwrite, in a folder that exists or can be made and is writable."""
    if out.is_dir():
        raise UsageError(f"{flag} {_shown(out)} is a folder; give a file name")
    if os.path.lexists(out) and not overwrite:
        raise UsageError(f"{flag} {_shown(out)} exists already (--overwrite replaces it)")
    folder = out.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {_shown(out)}: {_shown(folder)} is not a writable folder")


def cmd_info(args) -> int:
    from .models.dit import DiT
    from .models.dito import DiTo, count_parameters, decoder_gflops, encoder_gflops
    from .ops import available_backends

    print(f"{'preset':14s} {'encoder':>10s} {'decoder':>10s} {'latent':>8s} {'dec GFLOP/step':>16s} "
          f"{'enc GFLOP':>10s}")
    import torch

    for name in C.PRESETS:
        cfg = C.get_preset(name)
        with torch.device("meta"):
            m = DiTo(cfg)
        size = 64 if name in ("dito-tiny", "dito-S") else 256
        f = cfg.encoder.downsample_factor
        print(f"{name:14s} {count_parameters(m.encoder) / 1e6:9.2f}M {count_parameters(m.decoder) / 1e6:9.2f}M "
              f"{'f%dc%d' % (f, cfg.encoder.latent_channels):>8s} {decoder_gflops(cfg, size):10.2f} @{size:<4d} "
              f"{encoder_gflops(cfg, size):10.2f}")
    print(f"\n{'DiT preset':14s} {'params':>10s}  (for 4x32x32 latents, 1000 classes; dito_fast.DiT, train-dit)")
    for name in DIT_PRESETS:
        with torch.device("meta"):
            dit = DiT(DIT_PRESETS[name])
        print(f"{name:14s} {count_parameters(dit) / 1e6:9.2f}M")
    import importlib.util

    from .kernels.triton import HAS_TRITON
    from .ops import _cpp

    missing = {"cpp": None if _cpp.AVAILABLE else "extension not loaded",
               "triton": (None if HAS_TRITON and torch.cuda.is_available() else
                          "needs a CUDA GPU" if HAS_TRITON else "not installed"),
               "xformers": (None if importlib.util.find_spec("xformers") and torch.cuda.is_available() else
                            "needs a CUDA GPU" if importlib.util.find_spec("xformers") else "not installed")}
    print("\nbackends per op (priority order; the first that can run the inputs is used; in brackets: why "
          "one cannot run here):")
    for op, names in available_backends().items():
        print(f"  {op:26s} {', '.join(n if not missing.get(n) else f'{n} ({missing[n]})' for n in names)}")

    if _cpp.AVAILABLE:
        print(f"C++ extension: CPU kernels {_cpp._C.cpu_capability()}, CUDA kernels "
              f"{'built' if _cpp._C.has_cuda() else 'not built'}")
    else:
        print(f"C++ extension: unavailable ({_cpp.LOAD_ERROR})")
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"CUDA {'available' if torch.cuda.is_available() else 'not available'}")
    return 0


def cmd_sample_dit(args) -> int:
    import math
    import re

    from tqdm.auto import tqdm

    from .decode import fast_decode, resolve_settings
    from .diffusion import samplers
    from .eval.report import save_image
    from .models.dit import DiT
    from .models.dito import DiTo
    from .train import distributed
    from .train.checkpoint import atomic_write_json
    from .train.dit import read_latents_file

    import torch

    for flag, value in (("--num", args.num), ("--per-class", args.per_class), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be positive, got {value}")
    try:  # every setting checked before any model is loaded or file written
        samplers.get_sampler(args.sampler)
        samplers.make_timesteps(args.steps, args.schedule)
        decode = resolve_settings(args.decode_sampler, args.decode_steps)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise UsageError(f"--cfg-scale must be finite and >= 0 (1: no guidance), got {args.cfg_scale}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {_shown(out)} is a file; give a folder")
    # a folder of other files (an image set, a model) would have the samples mixed in: a later
    # `fid samples/ reference/` of either folder would count the other's images
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith(".") and p.name != "samples.json"
                    and not re.fullmatch(r"\d{6,}\.png", p.name)) if out.is_dir() else []
    if others:
        raise UsageError(f"--out {_shown(out)} holds other files ({', '.join(map(_shown, others[:3]))}"
                         f"{', ...' if len(others) > 3 else ''}): give an empty folder (or one sample-dit wrote)")
    ctx, dev = distributed.setup(device=args.device)  # no collectives: each rank writes its share
    ok = False
    try:
        dit = DiT.from_pretrained(args.model, map_location=dev, dtype=torch.float32)
        tokenizer = DiTo.from_pretrained(args.tokenizer, map_location=dev, dtype=torch.float32)
        if dit.config.latent_channels != tokenizer.latent_channels:
            raise UsageError(f"the DiT makes {dit.config.latent_channels}-channel latents, the tokenizer decodes "
                             f"{tokenizer.latent_channels}-channel ones")
        tokenizer_fingerprint = model_fingerprint(tokenizer)
        described = read_latents_file(args.model) or {}  # what train-dit recorded of the latents
        trained_on = described.get("tokenizer") or {}
        if trained_on.get("model_fingerprint", tokenizer_fingerprint) != tokenizer_fingerprint and not args.any_tokenizer:
            raise UsageError(f"{args.model} was trained on the latents of another tokenizer ({trained_on.get('model')}, "
                             f"fingerprint {trained_on['model_fingerprint']}) than {args.tokenizer} "
                             f"({tokenizer.config.name}, {tokenizer_fingerprint}): its images would be decoded from "
                             "another latent space (--any-tokenizer decodes them anyway)")
        conditional = dit.config.num_classes > 0
        if conditional:
            if args.num is not None or args.per_class is None:
                raise UsageError(f"{args.model} is class-conditional ({dit.config.num_classes} classes): give "
                                 "--per-class N (and --classes to choose them)")
            classes = (_class_list(args.classes, described.get("classes") or []) if args.classes is not None
                       else list(range(dit.config.num_classes)))
            bad = [c for c in classes if not 0 <= c < dit.config.num_classes]
            if bad or not classes:
                raise UsageError(f"--classes {bad or args.classes!r}: expected classes in 0..{dit.config.num_classes - 1}")
            labels = [c for c in classes for _ in range(args.per_class)]
        else:
            if args.num is None or args.per_class is not None or args.classes:
                raise UsageError(f"{args.model} is unconditional: give --num N (not --per-class or --classes)")
            if args.cfg_scale != 1.0:
                raise UsageError(f"--cfg-scale guides towards classes; {args.model} is unconditional")
            labels = [None] * args.num
        # what the images depend on: a folder holding another run's images is refused (they would
        # be kept and mixed into this one's), unless --overwrite makes every image again
        manifest = {"labels": labels, "cfg_scale": args.cfg_scale, "seed": args.seed, "steps": args.steps,
                    "sampler": args.sampler, "schedule": args.schedule, "decode": vars(decode),
                    "dit": model_fingerprint(dit), "tokenizer": tokenizer_fingerprint}
        targets = [out / f"{k:06d}.png" for k in range(len(labels))]
        stray = sorted(p for p in out.glob("*.png") if re.fullmatch(r"\d{6,}\.png", p.name)
                       and int(p.stem) >= len(labels)) if out.is_dir() else []
        saved = out / "samples.json"
        if not args.overwrite:
            previous = json.loads(saved.read_text()) if saved.is_file() else None
            if previous is not None and previous != json.loads(json.dumps(manifest)):
                changed = sorted(k for k in set(previous) | set(manifest) if previous.get(k) != manifest.get(k))
                raise UsageError(f"{_shown(out)} holds images made with other settings ({', '.join(changed)} "
                                 f"differ{'s' if len(changed) == 1 else ''}: samples.json); --overwrite makes every "
                                 "image again")
            if previous is None and any(p.exists() for p in targets) or stray:
                raise UsageError(f"{_shown(out)} holds numbered images of another run (or more than {len(labels)}); "
                                 "--overwrite makes every image again and removes the extra ones")
        if ctx.is_main:
            for p in stray:
                p.unlink()
            atomic_write_json(manifest, saved)
        # image k: latent noise seeded with seed + k, decode noise with seed + k + 2^63 (mod 2^64);
        # files present are kept (a stopped job continues where it was), unless --overwrite
        share = range(ctx.rank, len(labels), ctx.world_size)
        todo = [k for k in share if args.overwrite or not os.path.lexists(targets[k])]
        progress = ctx.is_main and not args.no_progress and sys.stderr.isatty()
        with tqdm(total=len(todo), desc="sample" if ctx.world_size == 1 else "sample (rank 0's share)", unit="image",
                  disable=not progress) as bar:
            for start in range(0, len(todo), args.batch_size):
                ks = todo[start:start + args.batch_size]
                y = torch.tensor([labels[k] for k in ks], device=dev) if conditional else None
                with torch.inference_mode():
                    z = dit.sample(y, batch_size=None if conditional else len(ks), steps=args.steps,
                                   sampler=args.sampler, schedule=args.schedule, cfg_scale=args.cfg_scale,
                                   seed=[(args.seed + k) % 2**64 for k in ks])
                    images = fast_decode(tokenizer, z, steps=decode.steps, sampler=decode.sampler,
                                         schedule=decode.schedule, seed=[(args.seed + k + 2**63) % 2**64 for k in ks],
                                         output="float")
                for k, image in zip(ks, images):
                    save_image(image, targets[k])  # (atomic)
                bar.update(len(ks))
        ok = True
    finally:
        distributed.teardown(ctx, ok)
    made, kept = len(todo), len(share) - len(todo)
    if ctx.world_size == 1:
        print(f"{len(labels)} images in {_shown(out)}: {made} made" + (f", {kept} there already and kept" if kept else ""))
    else:  # the other ranks may still be writing theirs
        print(f"rank {ctx.rank}: {made} of its {len(share)} images made, {kept} kept ({len(labels)} in all, in "
              f"{_shown(out)})")
    return 0


def _class_list(text: str, names: list[str]) -> list[int]:
    """--classes: comma-separated class folder names (a DiT train-dit made) or indices; a name
    wins over an index (numbered class folders sort as strings: folder "10" may be class 2)."""
    import re

    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in names:
            out.append(names.index(part))
        elif re.fullmatch(r"-?[0-9]+", part):
            out.append(int(part))
        else:
            raise UsageError(f"--classes: {part!r} is neither a class index nor one of the model's class names"
                             + (f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else
                                " (it has none: no latents.json from train-dit)"))
    return out


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, max_minutes=args.minutes, steps=args.steps)
    f = report["downsample_factor"]
    resumed = report["resumed_from_step"]
    print(f"trained {report['preset']} for {report['train_steps']} steps ({report['train_seconds']:.0f} s, "
          f"{report['threads']} threads) at {report['train_image_size']}x{report['train_image_size']}"
          + (f"; continued from step {resumed} of an earlier run in {args.out} (its time not counted)" if resumed else ""))
    print(f"{report['val_images']} ({report['num_val_images']} images, {report['eval_image_size']} px):")
    pd = report["paper_decode"]
    print(f"  DiTo, {report['decode']['steps']}-step {report['decode']['sampler']} (E[x|z]): {report['dito_psnr']:6.2f} dB")
    print(f"  DiTo, {pd['steps']}-step {pd['sampler']} (the paper's sampler): {report['dito_paper_decode_psnr']:6.2f} dB")
    print(f"  bicubic {f}x down/up baseline:           {report['bicubic_psnr']:6.2f} dB")
    print(f"  SSIM: DiTo {report['dito_ssim']:.3f} ({report['decode']['steps']}-step), "
          f"{report['dito_paper_decode_ssim']:.3f} ({pd['steps']}-step), bicubic {report['bicubic_ssim']:.3f}")
    if report["dito_psnr_synthetic"] is not None:
        print(f"held-out synthetic: DiTo {report['dito_psnr_synthetic']:.2f} dB "
              f"({report['dito_paper_decode_psnr_synthetic']:.2f} dB with {pd['steps']} steps), "
              f"bicubic {report['bicubic_psnr_synthetic']:.2f} dB")
        print(f"all held-out images: DiTo {report['dito_psnr_all_held_out']:.2f} dB, "
              f"bicubic {report['bicubic_psnr_all_held_out']:.2f} dB")
    print(("DiTo beats" if report["beats_baseline"] else "DiTo does NOT beat") + " the baseline; "
          f"details in {Path(args.out) / 'metrics.json'}")
    return 0


# --------------------------------------------------------------------------------------------
# parser


def _runs_on_cpu(args) -> bool:
    """Whether the command computes on the CPU: its ``--device``, or (none or "auto") no CUDA."""
    device = getattr(args, "device", None)
    if device in (None, "auto"):
        import torch

        return not torch.cuda.is_available()
    return str(device).startswith("cpu")


def _add_run_args(t: argparse.ArgumentParser, out: str, example: str, large: str) -> None:
    """The options ``train`` and ``train-dit`` share (their config keys: ``_RUN_FLAGS``)."""
    t.add_argument("--steps", type=int, default=None, help="training steps (train.steps)")
    t.add_argument("--batch-size", type=int, default=None, help="global batch size over all ranks (train.batch_size)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (train.lr)")
    t.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (train.device)")
    t.add_argument("--threads", type=int, default=None, help="CPU threads (train.threads; 0 = torch's default)")
    t.add_argument("--seed", type=int, default=None, help="seed of weights, data order and noise (train.seed)")
    t.add_argument("--parallel", choices=["ddp", "fsdp"], default=None,
                   help="under torchrun: 'ddp' (replicated model; default) or 'fsdp' (sharded parameters, gradients "
                        f"and optimizer state, for {large}; checkpoints resumable at another world size)")
    t.add_argument("--micro-batch-size", type=int, default=None,
                   help="samples per forward/backward on one rank; the rank's share of --batch-size (the global "
                        "batch) is accumulated over micro-batches (0 = auto)")
    t.add_argument("--grad-accum-steps", type=int, default=None,
                   help="split each rank's share of the global batch into this many micro-batches")
    t.add_argument("--dist-backend", choices=["auto", "nccl", "gloo", "mpi", "ucc"], default=None,
                   help="torch.distributed backend under torchrun (auto: nccl on CUDA, gloo on CPU)")
    t.add_argument("--dist-timeout", type=float, default=None, metavar="MINUTES",
                   help="how long a collective waits for the other ranks before the job fails "
                        "(default 0: torch's, 10 min for NCCL, 30 for gloo)")
    t.add_argument("--out", default=out, help="run directory")
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="resume from the latest complete checkpoint in --out, or from the given checkpoint dir, "
                        "with the settings it was written with (under torchrun --max-restarts, restarted workers "
                        "resume by themselves from the job's own newest checkpoint)")
    t.add_argument("--config", default=None, help="JSON file with (part of) a run config")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override any config value, e.g. --set {example}")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dito-fast", description="DiTo diffusion-autoencoder image tokenizers")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="when the command runs on the CPU, keep freed memory in the process instead of returning "
                        "it to the OS: no page faults on each step's large activations (a dito-B decoder step at "
                        "256x256 ran 1.27x faster on a 2-core CPU); the process keeps its peak heap (see "
                        "dito_fast.allocator; default: on)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a tokenizer",
                       epilog="Global flags: -v/--verbose and --[no-]keep-freed-memory go before 'train' "
                              "(dito-fast -v train ...); python -m dito_fast.train takes them anywhere.")
    t.add_argument("--preset", choices=list(C.PRESETS), default=None,
                   help="model preset (default: the one --set model.name or the config file names, else dito-B)")
    t.add_argument("--data", default=None,
                   help="'synthetic', 'builtin', a folder of images (class subfolders give labels), a text file "
                        "listing images ('path', 'path<TAB>label' or 'path label' per line), or webdataset tar shards "
                        "('x.tar', 'shards-{000..099}.tar', 'dir/*.tar')")
    t.add_argument("--image-size", type=int, default=None, help="training crop side in pixels (data.image_size)")
    t.add_argument("--workers", type=int, default=None,
                   help="data loading: PyTorch DataLoader worker processes (0 = in the training process), "
                        "or DALI CPU threads")
    t.add_argument("--loader", choices=["auto", "dali", "torch"], default=None,
                   help="data loader: 'dali' (NVIDIA DALI; GPU decoding when training on a GPU), 'torch' "
                        "(PIL + DataLoader workers), 'auto' (DALI when installed and a GPU is present; default)")
    _add_run_args(t, "runs/dito", "model.flow.noise_sync_prob=0.1", "dito-L/XL")
    t.set_defaults(func=cmd_train)

    d = sub.add_parser("train-dit", help="train a DiT on a tokenizer's latents (written by encode)",
                       description="Train the downstream DiT (dito_fast.DiT) on latents written by dito-fast encode: "
                                   "the model's latent shape and class count come from the data. The loop, its "
                                   "settings (--set train.*), checkpoints, resume and torchrun are train's; the "
                                   "validation figure is the loss on held-out latents. The model folder "
                                   "(--out/model) is what sample-dit takes.",
                       epilog="Global flags: -v/--verbose and --[no-]keep-freed-memory go before 'train-dit'.")
    d.add_argument("--preset", choices=list(DIT_PRESETS), default=None,
                   help="DiT preset (default: the one --set model.name or the config file names, else DiT-B/2)")
    d.add_argument("--data", default=None, help="a folder of latents written by dito-fast encode (recursive), or its "
                   "pack (dito-fast pack-latents: memory-mapped, shared by torchrun's processes)")
    d.add_argument("--class-folders", action="store_true", default=None,
                   help="class-conditional: each top-level subfolder of --data is a class (sorted names -> labels "
                        "0..K-1, as encode mirrors an image folder's); default: unconditional")
    d.add_argument("--tokenizer", default=None,
                   help="the DiTo model folder the latents came from (checked against their fingerprint): each "
                        "validation then also writes 8 decoded samples to --out/samples/dit_<step>.png")
    _add_run_args(d, "runs/dit", "train.ema_decay=0.9999", "DiT-L/XL")
    d.set_defaults(func=cmd_train_dit)

    x = sub.add_parser("export", help="write a training checkpoint's model as a model directory",
                       description="Write the model of a training checkpoint (any step; either checkpoint format, "
                                   "FSDP's DCP shards included) as config.json + model.safetensors, the directory "
                                   "reconstruct/encode/decode and DiTo.from_pretrained load (a train-dit run's: the "
                                   "directory sample-dit and DiT.from_pretrained load, with its latents.json). The "
                                   "run is not resumed.")
    x.add_argument("checkpoint", help="a checkpoint directory (RUN/checkpoints/step_N) or a run directory (its newest "
                   "complete checkpoint)")
    x.add_argument("--out", required=True, help="model directory to write (created if missing)")
    x.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                   help="'ema' (the EMA weights, as the run's own export), 'model' (the raw trained weights), "
                        "'auto' (EMA when the checkpoint holds them; default)")
    x.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
    x.set_defaults(func=cmd_export)

    r = sub.add_parser("reconstruct", help="encode and decode images")
    r.add_argument("model", help="model directory (config.json + model.safetensors)")
    r.add_argument("inputs", nargs="+", help="image files or folders")
    r.add_argument("--out", required=True)
    r.add_argument("--size", type=int, default=None, help="resize+center-crop to this size")
    r.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    _add_decode_args(r)
    r.set_defaults(func=cmd_reconstruct)

    e = sub.add_parser("encode", help="images -> latents (.safetensors, one file per image)",
                       description="Encode images to latents, one .safetensors file per image (key 'latent', "
                                   "shape (1, c, h, w), with --flip (2, c, h, w); its metadata: the source image, the "
                                   "model's name and fingerprint, the --size ('native' without) and with --flip "
                                   "views). Under "
                                   "torchrun each rank encodes a share (every WORLD_SIZE-th image) on its own device.")
    e.add_argument("model", help="model directory (config.json + model.safetensors)")
    e.add_argument("inputs", nargs="+", help="image files or folders (recursive; subfolders mirrored under --out)")
    e.add_argument("--out", required=True)
    e.add_argument("--size", type=int, default=None, help="resize+center-crop to this size")
    e.add_argument("--overwrite", action="store_true",
                   help="replace output files that exist already (with --skip-existing: those that differ only)")
    e.add_argument("--skip-existing", action="store_true",
                   help="continue an interrupted encode: an output file that exists already and holds what this "
                        "encode would write (the same source image, model fingerprint, --size and --flip, read from "
                        "its header) is kept and its image not encoded again; one that differs stops the command "
                        "before anything is written, naming it and the difference, unless --overwrite is given too "
                        "(then the ones that differ are encoded again)")
    e.add_argument("--device", default="auto")
    e.add_argument("--batch-size", type=int, default=16,
                   help="images encoded together (of one size; default 16): at most this many wait, besides those "
                        "read ahead; the latents depend on it by float rounding only")
    e.add_argument("--flip", action="store_true",
                   help="also encode each image's mirror image (left-right), as the file's second latent (shape "
                        "(2, c, h, w)): train-dit then trains on both, the flip augmentation a DiT is trained with")
    e.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="threads reading and resizing images ahead of the encoder (0: in turn; default min(4, CPUs))")
    e.set_defaults(func=cmd_encode)

    k = sub.add_parser("pack-latents", help="a folder of latents (written by encode) -> one memory-mapped pack file",
                       description="Write the readable latents of a folder that dito-fast encode wrote into one "
                                   "file (safetensors) that train-dit --data takes: opening it reads no latent (they "
                                   "are memory-mapped, so the processes of a torchrun job share one copy), where the "
                                   "folder is read file by file into each process's memory. Unreadable files are "
                                   "left out and listed (exit status 1); a run started on the folder resumes on its "
                                   "pack and the other way round.")
    k.add_argument("folder", help="the folder of .safetensors latents (recursive)")
    k.add_argument("--out", required=True, help="the pack file to write (e.g. latents.safetensors)")
    k.add_argument("--class-folders", action="store_true",
                   help="keep each latent's label, its top-level subfolder (as train-dit --class-folders reads them)")
    k.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    k.set_defaults(func=cmd_pack_latents)

    d = sub.add_parser("decode", help="latents (.safetensors) -> PNG images",
                       description="Decode latent files (as encode writes them) to PNG images: x.safetensors gives "
                                   "x.png, or x_0.png, x_1.png, ... when it holds several latents (encode --flip's "
                                   "image and mirror image). Each file is decoded as fast_decode(model, latents, "
                                   "seed=--seed) would: its latents' noise is one draw seeded with --seed, the same "
                                   "in every file (for a set of generated images whose decode noise should differ, "
                                   "decode them as one file, or use sample-dit).")
    d.add_argument("model", help="model directory (config.json + model.safetensors)")
    d.add_argument("inputs", nargs="+", help=".safetensors files, or folders of them (searched recursively; "
                   "subfolders are mirrored under --out, as encode writes them)")
    d.add_argument("--out", required=True)
    d.add_argument("--overwrite", action="store_true", help="replace output files that exist already")
    d.add_argument("--any-model", action="store_true",
                   help="decode latents that another model encoded (their metadata's fingerprint differs)")
    _add_fast_decode_args(d)
    d.set_defaults(func=cmd_decode)

    v = sub.add_parser("evaluate", help="reconstruction PSNR, SSIM, LPIPS and rFID over an image set",
                       description="Encode and decode every image of a set and report mean PSNR and SSIM, LPIPS "
                                   "with --lpips and rFID with --fid-weights (original and reconstruction compared "
                                   "as 8-bit images; image i's decode noise is seeded with --seed + i).")
    v.add_argument("model", help="model directory (config.json + model.safetensors)")
    v.add_argument("data", help="a folder of images (recursive, sorted), or 'builtin' / 'synthetic'")
    _add_image_set_args(v, batch_size=8, size_required=True)
    v.add_argument("--fid-reference", default=None,
                   help="feature statistics to compare with (.safetensors from --save-stats, or pytorch-fid's .npz); "
                        "default: the originals' own")
    v.add_argument("--lpips", nargs=2, metavar=("VGG16", "LPIPS_VGG"), default=None,
                   help="LPIPS too, from torchvision's vgg16-397923af.pth and the lpips package's "
                        "weights/v0.1/vgg.pth (or safetensors copies); none are downloaded")
    v.add_argument("--save-stats", default=None,
                   help="write the originals' feature statistics here (.safetensors, or .npz as pytorch-fid's)")
    v.add_argument("--json", default=None,
                   help="write the report here (means, each image's figures, the settings, the skipped files)")
    v.add_argument("--save-images", default=None,
                   help="write each reconstruction here as PNG (a folder's subfolders mirrored; builtin/synthetic: "
                        "000000.png, ...), e.g. for other FID tools")
    v.add_argument("--overwrite", action="store_true",
                   help="replace the --json, --save-stats and --save-images files if they exist")
    _add_fast_decode_args(v)
    v.set_defaults(func=cmd_evaluate)

    f = sub.add_parser("fid", help="FID between two image sets (or saved statistics)",
                       description="Fréchet Inception Distance between SOURCE and REFERENCE, each a folder of images "
                                   "(recursive; resized and center-cropped to --size, rounded to 8 bits), "
                                   "'builtin'/'synthetic', or a statistics file (--save-stats of this command or of "
                                   "evaluate; pytorch-fid's .npz). Under torchrun each rank reads a share.")
    f.add_argument("source", help="images (e.g. a model's samples) or statistics")
    f.add_argument("reference", help="images or statistics to compare with")
    _add_image_set_args(f, batch_size=50, size_required=False)
    f.add_argument("--save-stats", default=None, help="write SOURCE's statistics here (.safetensors, or .npz)")
    f.add_argument("--overwrite", action="store_true", help="replace the --save-stats file if it exists")
    f.add_argument("--device", default="auto", help="where the Inception network runs (default: a GPU if any)")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.set_defaults(func=cmd_fid)

    g = sub.add_parser("sample-dit", help="generate images with a DiT and a tokenizer (e.g. for gFID)",
                       description="Sample latents with a DiT (DiT.save_pretrained's directory) and decode them with "
                                   "its tokenizer, one PNG per image (000000.png, ...; samples.json records the "
                                   "labels and settings). Image k's noise is seeded from --seed + k, so a stopped run "
                                   "continues where it was (files present are kept; a folder of another run's images "
                                   "is refused unless --overwrite); under torchrun each rank makes every "
                                   "world_size-th image.")
    g.add_argument("model", help="DiT directory (config.json + model.safetensors)")
    g.add_argument("--tokenizer", required=True, help="the DiTo model directory whose latents the DiT was trained on "
                   "(checked against the model's latents.json when train-dit wrote it)")
    g.add_argument("--any-tokenizer", action="store_true",
                   help="decode with --tokenizer even if the DiT was trained on another tokenizer's latents")
    g.add_argument("--out", required=True, help="folder for the images (empty, or one sample-dit wrote)")
    g.add_argument("--num", type=int, default=None, help="images to make (unconditional model)")
    g.add_argument("--per-class", type=int, default=None, help="images per class (class-conditional model)")
    g.add_argument("--classes", default=None,
                   help="comma-separated class indices, or class folder names for a DiT train-dit made (default: all)")
    g.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance (1: none; default 1)")
    g.add_argument("--steps", type=int, default=50, help="DiT ODE steps (default 50)")
    g.add_argument("--sampler", default="euler", help="DiT ODE solver (default euler)")
    g.add_argument("--schedule", default="uniform", help="DiT time grid (default uniform)")
    g.add_argument("--decode-steps", type=int, default=None, help="the tokenizer's decode steps (default: auto's)")
    g.add_argument("--decode-sampler", default="auto", help="the tokenizer's decode solver (default auto)")
    g.add_argument("--batch-size", type=int, default=16, help="images per DiT and decode batch (default 16)")
    g.add_argument("--seed", type=_seed, default=0, help="image k's noise is seeded from seed + k (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--overwrite", action="store_true",
                   help="make every image again (and remove numbered images beyond the count)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_sample_dit)

    i = sub.add_parser("info", help="presets (parameters, GFLOPs per decoder step) and backends")
    i.set_defaults(func=cmd_info)

    m = sub.add_parser("demo", help="train dito-tiny on built-in data and report reconstruction PSNR")
    m.add_argument("--out", default="demo_out")
    m.add_argument("--minutes", type=float, default=None, help="wall-clock training budget (default from the demo)")
    m.add_argument("--steps", type=int, default=None, help="training steps (default from the demo)")
    m.set_defaults(func=cmd_demo)
    return p


@contextlib.contextmanager
def _sigterm_handled(train: bool):
    """While the command runs, SIGTERM (a scheduler's preemption notice): for ``train``, the first
    one stops training after the current step with a checkpoint and the exported model
    (``dito_fast.train.request_stop``), a second one interrupts; for the other commands it unwinds
    like Ctrl-C (open files closed, outputs written so far complete). Not under torchrun
    (WORLD_SIZE > 1), whose agent stops its workers with SIGTERM and expects them gone at once,
    even inside a collective; nor outside the main thread, where Python cannot set handlers."""
    import signal
    import threading

    asked = []

    def handler(signum, frame):
        if train and not asked:
            from .train import request_stop

            asked.append(signum)
            request_stop()
            print("SIGTERM: stopping after this step with a checkpoint (again to interrupt now)", file=sys.stderr)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    import faulthandler

    if not faulthandler.is_enabled():
        # a fatal signal (SIGBUS: a memory-mapped latent pack cut short under a run) ends the
        # process with its Python stack on stderr, not without a word
        with contextlib.suppress(AttributeError, ValueError, OSError):  # (a stderr without a file descriptor)
            faulthandler.enable()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("PIL").setLevel(logging.INFO)  # -v: not every PNG chunk PIL reads
    if args.keep_freed_memory and _runs_on_cpu(args):
        keep_freed_memory()
    try:
        with _sigterm_handled(train=args.command in ("train", "train-dit")):
            return args.func(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = (f"; continue with: dito-fast {args.command} --out {args.out} --resume (from its latest checkpoint)"
                if args.command in ("train", "train-dit") else
                "; no pack was written (it is written whole or not at all)" if args.command == "pack-latents" else
                "; files written so far are complete")
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `dito-fast info | head -1`: the reader left; nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except (OSError, ValueError, KeyError) as e:  # bad input or an unusable path: one clear line, no traceback
        # KeyError's str() quotes its message; an OSError's args[0] is its errno
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from .data import DALIUnavailableError
        from .train import TrainingDivergedError

        if isinstance(e, DALIUnavailableError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        if not isinstance(e, TrainingDivergedError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
