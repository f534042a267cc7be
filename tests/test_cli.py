"""Tests for the ``dito-fast`` command (dito_fast/cli.py), run in-process on a temporary folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from dito_fast import PRESETS
from dito_fast.cli import main
from dito_fast.decode import fast_decode
from dito_fast.models.dito import DiTo
from conftest import cli_usage_error as _usage_error


def _write_images(folder: Path, n: int = 6, size=(48, 40)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    W, H = size
    yy, xx = np.mgrid[0:H, 0:W]
    paths = []
    for i in range(n):
        base = np.stack([xx * 255 / W, yy * 255 / H, np.full((H, W), 40 * i)], -1)
        arr = np.clip(base + rng.normal(0, 10, (H, W, 3)), 0, 255).astype(np.uint8)
        p = folder / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One CLI training run shared by the tests below: (run dir, image folder, stdout)."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    _write_images(data)
    out = root / "run"
    sets = ["model.encoder.base_channels=8", "model.encoder.norm_groups=4",
            "model.decoder.level_channels=8,16,16,16", "model.decoder.norm_groups=4",
            "model.decoder.time_freq_dim=32", "model.decoder.time_embed_dim=64",
            "train.val_every_steps=0", "train.val_images=1", "train.val_sample_steps=2",
            "train.checkpoint_every_steps=0", "train.log_every_steps=1"]
    argv = ["train", "--preset", "dito-tiny", "--data", str(data), "--steps", "2", "--batch-size", "2",
            "--image-size", "32", "--out", str(out), "--device", "cpu", "--seed", "3"]
    for s in sets:
        argv += ["--set", s]
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(argv)
    assert rc == 0
    return out, data, buf.getvalue(), argv


def test_train_outputs(trained):
    out, data, stdout, _ = trained
    assert "trained 2 steps (0 non-finite steps skipped)" in stdout and str(out / "model") in stdout
    assert "validation PSNR" in stdout
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["source"] == str(data) and cfg["data"]["image_size"] == 32
    assert cfg["train"]["steps"] == 2 and cfg["train"]["batch_size"] == 2 and cfg["train"]["seed"] == 3
    assert cfg["model"]["name"] == "dito-tiny" and cfg["model"]["decoder"]["level_channels"] == [8, 16, 16, 16]
    model = DiTo.from_pretrained(out / "model")
    assert model.config.encoder.base_channels == 8
    assert (out / "checkpoints" / "step_00000002" / "COMPLETE").is_file()


def test_train_resume_and_refuse_overwrite(trained, tmp_path, capsys):
    out, _, _, argv = trained
    run = tmp_path / "run"
    import shutil

    shutil.copytree(out, run)
    argv = [a if a != str(out) else str(run) for a in argv]
    assert main(argv) == 2  # fresh start into a run with checkpoints: one line, no traceback
    assert "error:" in (err := capsys.readouterr().err) and "already holds checkpoints" in err
    steps_at = argv.index("--steps") + 1
    argv3 = argv[:steps_at] + ["3"] + argv[steps_at + 1:] + ["--resume"]
    assert main(argv3) == 0
    assert "trained 3 steps" in capsys.readouterr().out


def test_reconstruct(trained, tmp_path, capsys):
    out, data, _, _ = trained
    rec = tmp_path / "rec"
    assert main(["reconstruct", str(out / "model"), str(data / "img0.png"), "--out", str(rec), "--steps", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "PSNR" in stdout and "img0.png" in stdout
    img = Image.open(rec / "img0.png")
    assert img.size == (48, 40) and img.mode == "RGB"  # 48x40 is already a multiple of 8
    # a folder, resized and center-cropped with --size
    assert main(["reconstruct", str(out / "model"), str(data), "--out", str(rec / "s"), "--size", "16",
                 "--steps", "1", "--sampler", "heun", "--schedule", "edm:5"]) == 0  # a parameter, as decode takes
    written = sorted(p.name for p in (rec / "s").glob("*.png"))
    assert written == [f"img{i}.png" for i in range(6)]
    assert all(Image.open(rec / "s" / n).size == (16, 16) for n in written)


def test_encode_then_decode(trained, tmp_path, capsys):
    out, data, _, _ = trained
    lat, dec = tmp_path / "lat", tmp_path / "dec"
    assert main(["encode", str(out / "model"), str(data / "img1.png"), str(data / "img2.png"),
                 "--out", str(lat)]) == 0
    assert "latent (1, 4, 5, 6)" in capsys.readouterr().out
    tensors = load_file(str(lat / "img1.safetensors"))
    z = tensors["latent"]
    assert z.shape == (1, 4, 5, 6) and z.dtype == torch.float32
    # the saved latent is the model's encoding of the image
    model = DiTo.from_pretrained(out / "model").eval()
    x = torch.from_numpy(np.array(Image.open(data / "img1.png"), dtype=np.float32)).permute(2, 0, 1)[None]
    # float32: oneDNN's results for this strided input and the CLI's contiguous one differ by ~2e-5
    # (latents are O(1)); another image or model differs by O(1)
    assert torch.allclose(model.encode(x / 127.5 - 1), z, atol=1e-4)

    assert main(["decode", str(out / "model"), str(lat), "--out", str(dec), "--steps", "2", "--seed", "4"]) == 0
    assert sorted(p.name for p in dec.glob("*.png")) == ["img1.png", "img2.png"]
    png = torch.from_numpy(np.array(Image.open(dec / "img1.png"))).permute(2, 0, 1)
    assert png.shape == (3, 40, 48)
    assert torch.equal(png, fast_decode(model, z, steps=2, seed=4)[0])


def _latents(folder: Path) -> dict:
    return {str(p.relative_to(folder)): load_file(str(p))["latent"] for p in sorted(folder.rglob("*.safetensors"))}


def test_encode_in_batches_gives_each_image_its_own_latent(trained, tmp_path, capsys):
    """Batches (of one image size each: 48x40 and 32x24 here), read ahead by threads: the same
    latents as one image at a time; a corrupt image is skipped and counted."""
    out, data, _, _ = trained
    imgs = tmp_path / "imgs"
    _write_images(imgs / "big", n=5)
    _write_images(imgs / "small", n=3, size=(32, 24))
    (imgs / "big" / "img9.png").write_bytes(b"not a png")
    one = ["encode", str(out / "model"), str(imgs), "--batch-size", "1", "--workers", "0", "--out", str(tmp_path / "a")]
    assert main(one) == 1
    assert main(["encode", str(out / "model"), str(imgs), "--batch-size", "4", "--workers", "2",
                 "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err
    assert err.count("skipped ") == 2 and err.count("1 of 9 inputs could not be read") == 2
    a, b = _latents(tmp_path / "a"), _latents(tmp_path / "b")
    assert sorted(a) == sorted(b) and len(a) == 8
    assert a["big/img0.safetensors"].shape == (1, 4, 5, 6) and a["small/img0.safetensors"].shape == (1, 4, 3, 4)
    for k in a:  # (oneDNN's convolutions may sum in another order for another batch size)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)
    meta = safe_open_metadata(tmp_path / "b" / "small" / "img2.safetensors")
    assert meta["source"].endswith("small/img2.png") and meta["model"] == json.loads(
        (out / "model" / "config.json").read_text())["name"]
    assert main(one[:-1] + [str(tmp_path / "c"), "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_encode_flip_adds_the_mirror_images_latent(trained, tmp_path, capsys):
    out, data, _, _ = trained
    mirrored = tmp_path / "mirrored"
    mirrored.mkdir()
    for p in sorted(data.glob("*.png")):
        Image.open(p).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(mirrored / p.name)
    base = ["encode", str(out / "model"), "--batch-size", "4", "--workers", "0"]
    assert main(base + [str(data), "--out", str(tmp_path / "f"), "--flip"]) == 0
    assert "latent (2, 4, 5, 6)" in capsys.readouterr().out
    assert main(base + [str(data), "--out", str(tmp_path / "a")]) == 0
    assert main(base + [str(mirrored), "--out", str(tmp_path / "m")]) == 0
    f, a, m = (_latents(tmp_path / d) for d in "fam")
    assert sorted(f) == sorted(a) == sorted(m) and len(f) == 6
    for k in f:  # [the image's latent, its mirror image's]; another image's would differ by O(1)
        torch.testing.assert_close(f[k][:1], a[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(f[k][1:], m[k], rtol=0, atol=1e-5)
        assert (f[k][0] - f[k][1]).abs().max() > 1e-2
    assert safe_open_metadata(tmp_path / "f" / "img0.safetensors")["views"] == "image,mirrored"


def safe_open_metadata(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as h:
        return h.metadata()


@pytest.mark.slow
def test_encode_under_torchrun_shares_the_images(trained, tmp_path):
    """2 ranks: every image encoded once, by one of them, as one process encodes it."""
    import os

    from dito_fast.testing import run_process_tree

    import shutil

    out, data, _, _ = trained
    shutil.copytree(data, tmp_path / "imgs")
    (tmp_path / "imgs" / "img9.png").write_bytes(b"")  # sorts last: rank 0's fourth image
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = ["-m", "dito_fast.cli", "encode", str(out / "model"), str(tmp_path / "imgs"), "--batch-size", "2"]
    one = run_process_tree([sys.executable, *argv, "--out", str(tmp_path / "one")], timeout=300, env=env)
    assert one.returncode == 1, one.stderr[-3000:]  # (one image skipped)
    two = run_process_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            *argv, "--out", str(tmp_path / "two")], timeout=300, env=env)
    # a rank that skipped an image exits 0 (torchrun would stop the others), saying so
    assert two.returncode == 0, two.stderr[-3000:]
    assert "rank 0: 3 of its 4 images encoded, 1 unreadable and skipped (7 in all)" in two.stdout
    assert "rank 1: 3 of its 3 images encoded (7 in all)" in two.stdout
    a, b = _latents(tmp_path / "one"), _latents(tmp_path / "two")
    assert sorted(a) == sorted(b) and len(a) == 6
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def _stamps(folder: Path) -> dict:
    """Each latent file's (inode, mtime): a file written again (atomically, by a rename) differs."""
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.rglob("*.safetensors")}


def test_encode_skip_existing_continues_an_interrupted_encode(trained, tmp_path, capsys):
    # an interrupted encode could not be continued: the rerun refused the outputs written so far
    # (pass --overwrite), and an ImageNet-sized encode had to start over
    import shutil

    out, data, _, _ = trained
    imgs = tmp_path / "imgs"
    shutil.copytree(data, imgs / "cls")
    (imgs / "cls" / "img9.png").write_bytes(b"not a png")
    base = ["encode", str(out / "model"), str(imgs), "--size", "32", "--flip", "--batch-size", "4", "--workers", "0"]
    assert main(base + ["--out", str(tmp_path / "whole")]) == 1  # (img9 skipped)
    part = tmp_path / "part"
    assert main(base + ["--out", str(part)]) == 1
    for name in ("img1", "img3", "img4"):  # the encode stopped before writing these
        (part / "cls" / f"{name}.safetensors").unlink()
    kept = _stamps(part)
    capsys.readouterr()
    assert main(base + ["--out", str(part), "--skip-existing"]) == 1
    stdout = capsys.readouterr().out
    assert "encoded 3 images, 3 already done (--skip-existing), 1 unreadable skipped" in stdout
    assert stdout.count(" -> ") == 3 and all(f"{n}.png ->" in stdout for n in ("img1", "img3", "img4"))
    assert {k: v for k, v in _stamps(part).items() if k in kept} == kept  # the done ones untouched
    whole, continued = _latents(tmp_path / "whole"), _latents(part)
    assert sorted(whole) == sorted(continued) and len(whole) == 6
    for k in whole:  # (another batch's composition: float rounding only)
        torch.testing.assert_close(continued[k], whole[k], rtol=0, atol=1e-5)
    assert safe_open_metadata(part / "cls" / "img1.safetensors")["size"] == "32"
    stamps = _stamps(part)
    assert main(base + ["--out", str(part), "--skip-existing"]) == 1  # all done: nothing written
    assert "encoded 0 images, 6 already done (--skip-existing), 1 unreadable skipped" in capsys.readouterr().out
    assert _stamps(part) == stamps


def test_encode_skip_existing_refuses_outputs_that_differ(trained, tmp_path, capsys):
    """An existing output counts as done only when it holds what this encode would write; one
    that differs (another --size, --flip, model or source image; cut short; not a latent file) is
    refused by name before anything is written, or re-encoded with --overwrite too (only those)."""
    import shutil

    out, data, _, _ = trained
    model, lat = str(out / "model"), tmp_path / "lat"
    base = ["encode", model, str(data), "--workers", "0", "--out", str(lat), "--skip-existing"]
    assert main(base + ["--size", "32"]) == 0
    stamps, first = _stamps(lat), {k: v.clone() for k, v in _latents(lat).items()}  # (load_file maps the files)
    for extra, match in ((["--size", "64"], "img0.safetensors was encoded with --size 32; this encode has --size 64"),
                         ([], "img0.safetensors was encoded with --size 32; this encode has no --size"),
                         (["--size", "32", "--flip"], "img0.safetensors was encoded without --flip")):
        _usage_error(capsys, "6 existing output file(s) differ", base + extra)
        _usage_error(capsys, match, base + extra)
    other = DiTo.from_pretrained(out / "model")
    with torch.no_grad():
        other.encoder.conv_in.weight.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    _usage_error(capsys, "img0.safetensors was encoded by another model",
                 ["encode", str(tmp_path / "other"), *base[2:], "--size", "32"])
    shutil.copytree(data, tmp_path / "copy")  # the same names, other images
    _usage_error(capsys, f"is the latent of {data / 'img0.png'}, not of {tmp_path / 'copy' / 'img0.png'}",
                 ["encode", model, str(tmp_path / "copy"), *base[3:], "--size", "32"])
    assert _stamps(lat) == stamps  # nothing written
    cut = (lat / "img2.safetensors").read_bytes()
    (lat / "img2.safetensors").write_bytes(cut[:-8])
    (lat / "img3.safetensors").write_bytes(b"junk")
    err = _usage_error(capsys, "2 existing output file(s) differ", base + ["--size", "32"])
    assert f"img2.safetensors is {len(cut) - 8} bytes where its header says {len(cut)}" in err
    assert "img3.safetensors cannot be read" in err
    meta = safe_open_metadata(lat / "img4.safetensors")
    del meta["size"]  # as an encode that did not record its size wrote it
    save_file({"latent": first["img4.safetensors"]}, lat / "img4.safetensors", metadata=meta)
    _usage_error(capsys, "img4.safetensors does not record the --size", base + ["--size", "32"])
    stamps = _stamps(lat)
    assert main(base + ["--size", "32", "--overwrite"]) == 0
    assert "encoded 3 images, 3 already done (--skip-existing)" in capsys.readouterr().out
    again = _stamps(lat)
    assert [k for k in sorted(again) if again[k] != stamps[k]] == [f"img{i}.safetensors" for i in (2, 3, 4)]
    latents = _latents(lat)
    for k in first:
        torch.testing.assert_close(latents[k], first[k], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_encode_skip_existing_under_torchrun_shares_what_is_left(trained, tmp_path):
    """2 ranks continuing an interrupted encode skip the same done outputs before sharing out the
    rest: each missing image is encoded once, by one rank, and the done ones are untouched."""
    import os

    from dito_fast.testing import run_process_tree

    out, data, _, _ = trained
    lat = tmp_path / "lat"
    argv = ["encode", str(out / "model"), str(data), "--batch-size", "2", "--workers", "0", "--out", str(lat)]
    assert main(argv) == 0
    whole = _latents(lat)
    for i in (0, 1, 4):
        (lat / f"img{i}.safetensors").unlink()
    kept = _stamps(lat)
    two = run_process_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "-m", "dito_fast.cli", *argv, "--skip-existing"], timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert two.returncode == 0, two.stderr[-3000:]
    # the 3 left shared out (img0, img4 | img1); ranks filtering their own shares would have had 3 each
    assert "rank 0: 2 of its 2 images encoded (3 in all; 3 already done (--skip-existing))" in two.stdout
    assert "rank 1: 1 of its 1 images encoded (3 in all; 3 already done (--skip-existing))" in two.stdout
    assert two.stdout.count(" -> ") == 3
    assert {k: v for k, v in _stamps(lat).items() if k in kept} == kept
    latents = _latents(lat)
    assert sorted(latents) == sorted(whole)
    for k in whole:
        torch.testing.assert_close(latents[k], whole[k], rtol=0, atol=1e-5)


def test_outputs_never_clash_or_replace_inputs(trained, tmp_path, capsys):
    # reconstruct --out <the input folder> had replaced every input PNG by its reconstruction, and
    # inputs of one stem (x.png, x.jpg, sub/x.png) had overwritten one another's outputs
    out, data, _, _ = trained
    model = str(out / "model")
    shots = tmp_path / "shots"
    (shots / "sub").mkdir(parents=True)
    img = Image.open(data / "img0.png")
    img.save(shots / "x.png")
    img.save(shots / "sub" / "x.png")
    before = (shots / "x.png").read_bytes()
    _usage_error(capsys, "would replace the input", ["reconstruct", model, str(shots), "--out", str(shots), "--steps", "1"])
    assert (shots / "x.png").read_bytes() == before
    # a folder's subfolders are mirrored under --out
    assert main(["encode", model, str(shots), "--out", str(tmp_path / "lat")]) == 0
    assert sorted(str(p.relative_to(tmp_path / "lat")) for p in (tmp_path / "lat").rglob("*.safetensors")) == [
        "sub/x.safetensors", "x.safetensors"]
    img.save(shots / "x.jpg")
    _usage_error(capsys, "would both be written to", ["encode", model, str(shots), "--out", str(tmp_path / "lat2")])
    assert not (tmp_path / "lat2").exists()


def test_decode_refuses_latents_of_another_model(trained, tmp_path, capsys):
    # encode records the model's fingerprint; a latent decoded by another model's decoder had
    # given a wrong image without a word
    out, data, _, _ = trained
    assert main(["encode", str(out / "model"), str(data / "img1.png"), "--out", str(tmp_path / "lat")]) == 0
    other = DiTo.from_pretrained(out / "model")
    with torch.no_grad():
        other.decoder.conv_out.bias.add_(0.1)
    other.save_pretrained(tmp_path / "other")
    _usage_error(capsys, "was encoded by another model", ["decode", str(tmp_path / "other"), str(tmp_path / "lat"), "--out", str(tmp_path / "d"),
              "--steps", "1", "--no-progress"])
    assert main(["decode", str(tmp_path / "other"), str(tmp_path / "lat"), "--out", str(tmp_path / "d"),
                 "--steps", "1", "--no-progress", "--any-model"]) == 0
    assert main(["decode", str(out / "model"), str(tmp_path / "lat"), "--out", str(tmp_path / "d2"),
                 "--steps", "1", "--no-progress"]) == 0


def test_unreadable_inputs_are_skipped_and_the_exit_code_says_so(trained, tmp_path, capsys):
    out, data, _, _ = trained
    folder = tmp_path / "in"
    folder.mkdir()
    Image.open(data / "img0.png").save(folder / "a.png")
    (folder / "b.png").write_bytes(b"not a png")
    assert main(["encode", str(out / "model"), str(folder), "--out", str(tmp_path / "lat")]) == 1
    err = capsys.readouterr().err
    assert "skipped" in err and "b.png" in err and "1 of 2 inputs could not be read" in err
    assert (tmp_path / "lat" / "a.safetensors").is_file()


def test_files_get_the_umask_mode_and_os_errors_are_one_line(trained, tmp_path, capsys):
    import os
    import stat

    out, data, _, _ = trained
    assert main(["encode", str(out / "model"), str(data / "img1.png"), "--out", str(tmp_path / "lat")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for f in (tmp_path / "lat" / "img1.safetensors", out / "model" / "model.safetensors", out / "model" / "config.json"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask  # mkstemp's 0600 had been kept
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert main(["encode", str(out / "model"), str(data / "img1.png"), "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "afile" in err and "Traceback" not in err  # was a traceback / 'error: 17'
    assert main(["encode", str(out / "model"), str(data / "img1.png"), "--out", str(tmp_path / "o"),
                 "--device", "bogus"]) == 2
    assert "unknown device 'bogus'" in capsys.readouterr().err


def test_decode_batch_file_writes_one_png_per_latent(trained, tmp_path, capsys):
    out, _, _, _ = trained
    save_file({"latent": torch.randn(3, 4, 2, 2)}, str(tmp_path / "batch.safetensors"))
    assert main(["decode", str(out / "model"), str(tmp_path / "batch.safetensors"), "--out",
                 str(tmp_path / "d"), "--steps", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "d").glob("*.png")) == [f"batch_{i}.png" for i in range(3)]


def test_decode_follows_symlinked_folders_each_once(trained, tmp_path):
    """A linked subfolder is decoded like a real one (mirrored under --out); a link back up the
    tree is no loop."""
    out, _, _, _ = trained
    lat = tmp_path / "lat"
    (tmp_path / "elsewhere").mkdir()
    save_file({"latent": torch.randn(1, 4, 2, 2)}, str(tmp_path / "elsewhere" / "b.safetensors"))
    (lat / "real").mkdir(parents=True)
    save_file({"latent": torch.randn(1, 4, 2, 2)}, str(lat / "real" / "a.safetensors"))
    (lat / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (lat / "real" / "up").symlink_to(lat, target_is_directory=True)
    assert main(["decode", str(out / "model"), str(lat), "--out", str(tmp_path / "d"), "--steps", "1"]) == 0
    assert sorted(str(p.relative_to(tmp_path / "d")) for p in (tmp_path / "d").rglob("*.png")) == [
        "linked/b.png", "real/a.png"]


def test_a_fatal_signal_prints_the_stack(tmp_path):
    """SIGBUS (a memory-mapped pack cut short under a run) or another fatal signal ends the
    command with Python's stack on stderr (faulthandler), not without a word."""
    import signal

    code = ("import os, signal, dito_fast.cli as cli\n"
            "cli.cmd_info = lambda args: os.kill(os.getpid(), signal.SIGBUS)\n"
            "cli.main(['info'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGBUS, (proc.returncode, proc.stderr)
    assert "Fatal Python error: Bus error" in proc.stderr and "cli.py" in proc.stderr and "in main" in proc.stderr, \
        proc.stderr


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", "--preset", "dito-S", "--dry-run", "--steps", "7", "--lr", "3e-4", "--dist-timeout", "45",
                 "--set", "model.flow.noise_sync_prob=0.1", "--set", "model.decoder.level_channels=[32,64,64,64]",
                 "--set", "train.ema_decay=0"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["name"] == "dito-S"
    assert cfg["model"]["flow"]["noise_sync_prob"] == 0.1
    assert cfg["model"]["decoder"]["level_channels"] == [32, 64, 64, 64]
    assert cfg["train"]["steps"] == 7 and cfg["train"]["lr"] == 3e-4 and cfg["train"]["ema_decay"] == 0.0
    assert cfg["train"]["dist_timeout_minutes"] == 45.0


def test_dry_run_with_config_file(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"batch_size": 5}, "data": {"image_size": 128}}))
    assert main(["train", "--preset", "dito-tiny", "--config", str(tmp_path / "c.json"), "--dry-run",
                 "--image-size", "96"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["train"]["batch_size"] == 5 and cfg["data"]["image_size"] == 96


def test_resume_takes_the_settings_it_was_written_with(trained, tmp_path, capsys):
    # resuming into another --out, or naming the preset again, had resolved the defaults (image
    # size 64, batch 64, another model) instead of the run's settings
    out, _, _, _ = trained
    step = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert main(["train", "--resume", str(step), "--out", str(tmp_path / "new"), "--steps", "5", "--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    saved = json.loads((step / "config.json").read_text())
    assert cfg["model"] == saved["model"] and cfg["data"] == saved["data"]
    assert cfg["train"] == {**saved["train"], "steps": 5}
    assert main(["train", "--resume", "--out", str(out), "--preset", "dito-tiny", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == saved["model"]
    _usage_error(capsys, "--preset dito-S, but the run to resume trained dito-tiny", ["train", "--resume", str(step), "--out", str(tmp_path / "new"), "--preset", "dito-S", "--dry-run"])


def test_info_lists_presets(capsys):
    assert main(["info"]) == 0
    stdout = capsys.readouterr().out
    for name in PRESETS:
        assert name in stdout
    assert "162.78M" in stdout and "34.15M" in stdout and "f16c8" in stdout
    assert "latent_layernorm" in stdout and "backends" in stdout


# --------------------------------------------------------------------------------------------
# bad inputs


def test_missing_model_dir(tmp_path, capsys):
    img = _write_images(tmp_path / "imgs", n=1)[0]
    rc = main(["reconstruct", str(tmp_path / "no_model"), str(img), "--out", str(tmp_path / "o")])
    assert rc != 0
    assert "model directory not found" in capsys.readouterr().err


def test_existing_outputs_are_kept_unless_overwrite(trained, tmp_path, capsys):
    # reconstruct photos/holiday.jpg --out photos had replaced the user's own holiday.png
    out, data, _, _ = trained
    model = str(out / "model")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(data / "img0.png").save(photos / "holiday.jpg")
    Image.open(data / "img1.png").save(photos / "holiday.png")  # another picture, the user's
    before = (photos / "holiday.png").read_bytes()
    _usage_error(capsys, "1 output file(s) exist already", ["reconstruct", model, str(photos / "holiday.jpg"),
                                                             "--out", str(photos), "--steps", "1"])
    assert (photos / "holiday.png").read_bytes() == before
    assert main(["reconstruct", model, str(photos / "holiday.jpg"), "--out", str(photos), "--steps", "1",
                 "--overwrite"]) == 0
    assert (photos / "holiday.png").read_bytes() != before
    capsys.readouterr()
    dangling = tmp_path / "links"
    dangling.mkdir()
    (dangling / "holiday.png").symlink_to(tmp_path / "elsewhere.png")  # a link whose target is gone (or not yet made)
    _usage_error(capsys, "1 output file(s) exist already", ["reconstruct", model, str(photos / "holiday.jpg"),
                                                             "--out", str(dangling), "--steps", "1"])
    assert (dangling / "holiday.png").is_symlink()
    assert main(["encode", model, str(photos / "holiday.jpg"), "--out", str(tmp_path / "lat")]) == 0
    _usage_error(capsys, "pass --overwrite", ["encode", model, str(photos / "holiday.jpg"), "--out", str(tmp_path / "lat")])
    _usage_error(capsys, "pass --overwrite", ["decode", model, str(tmp_path / "lat"), "--out", str(photos), "--steps", "1",
                                              "--no-progress"])
    _usage_error(capsys, "is a file; it must be a folder", ["encode", model, str(photos / "holiday.jpg"),
                                                            "--out", str(photos / "holiday.png")])
    # the same file named twice is encoded once
    assert main(["encode", model, str(photos / "holiday.jpg"), str(photos / "holiday.jpg"), "--out",
                 str(tmp_path / "lat2")]) == 0


def test_an_image_too_small_is_skipped_and_the_rest_done(trained, tmp_path, capsys):
    out, data, _, _ = trained
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.open(data / "img0.png").save(imgs / "a_first.png")
    Image.new("RGB", (4, 4)).save(imgs / "b_tiny.png")
    Image.open(data / "img1.png").save(imgs / "c_last.png")
    assert main(["encode", str(out / "model"), str(imgs), "--out", str(tmp_path / "lat")]) == 1  # partly done
    assert sorted(p.name for p in (tmp_path / "lat").iterdir()) == ["a_first.safetensors", "c_last.safetensors"]
    err = capsys.readouterr().err
    assert "b_tiny.png: image 4x4 is smaller than 8 pixels" in err and "1 of 3 inputs could not be read" in err


def test_resume_with_nothing_to_resume_is_refused(tmp_path, capsys):
    # a mistyped --out under --resume had started a fresh dito-B run (the default preset)
    _usage_error(capsys, "nothing to resume in", ["train", "--out", str(tmp_path / "runs" / "tinyy"), "--resume",
                                                  "--steps", "2"])
    assert not (tmp_path / "runs").exists()
    assert main(["train", "--out", str(tmp_path / "new"), "--resume", "--preset", "dito-tiny", "--dry-run"]) == 0


def test_decode_checks_latent_shapes_and_dtypes_first(trained, tmp_path, capsys):
    out, _, _, _ = trained
    lat = tmp_path / "lat"
    lat.mkdir()
    save_file({"latent": torch.zeros(1, 4, 4, 4)}, str(lat / "a.safetensors"))
    save_file({"latent": torch.zeros(1, 3, 4, 4)}, str(lat / "z.safetensors"))
    _usage_error(capsys, "z.safetensors: its latent is F32 (1, 3, 4, 4)", ["decode", str(out / "model"), str(lat),
                                                                          "--out", str(tmp_path / "o"), "--steps", "1"])
    (lat / "z.safetensors").unlink()
    save_file({"latent": torch.zeros(1, 4, 4, 4, dtype=torch.int32)}, str(lat / "i.safetensors"))
    _usage_error(capsys, "its latent is I32", ["decode", str(out / "model"), str(lat), "--out", str(tmp_path / "o"),
                                               "--steps", "1"])
    assert not (tmp_path / "o").exists()  # nothing decoded before the refusal


def test_decode_checks_its_settings_for_every_latent_size_first(trained, tmp_path, capsys):
    """A tile that does not fit one file's size, or a bad setting, stops decode before any image
    is written (it had written the files before that one, and the corrected rerun then refused
    them as existing outputs); a setting's error names no file."""
    out, _, _, _ = trained
    lat = tmp_path / "lat"
    lat.mkdir()
    save_file({"latent": torch.zeros(1, 4, 4, 4)}, str(lat / "a_small.safetensors"))  # 32 x 32 pixels
    save_file({"latent": torch.zeros(1, 4, 16, 16)}, str(lat / "b_big.safetensors"))  # 128 x 128
    argv = ["decode", str(out / "model"), str(lat), "--out", str(tmp_path / "o"), "--steps", "1", "--tile", "64"]
    _usage_error(capsys, "b_big.safetensors (and any latent of its size): tile 64 must be larger than tile_overlap",
                 argv)
    _usage_error(capsys, "error: steps must be an integer >= 1, got 0", argv[:5] + ["--steps", "0"])
    assert not (tmp_path / "o").exists()
    assert main(argv + ["--tile-overlap", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_small.png", "b_big.png"]


def test_interrupts_end_with_one_line(monkeypatch, capsys):
    import signal

    import dito_fast.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; files written so far are complete"
    # SIGTERM (a scheduler's preemption) unwinds like Ctrl-C while a command runs
    previous = signal.getsignal(signal.SIGTERM)

    def terminated(args):
        signal.raise_signal(signal.SIGTERM)
    monkeypatch.setattr(cli, "cmd_info", terminated)
    assert main(["info"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is previous  # restored after the command


def test_sigterm_stops_training_with_a_checkpoint(tmp_path):
    """A scheduler's preemption notice (SIGTERM) to `dito-fast train`: the step under way ends, a
    checkpoint and the exported model are written, exit status 0 (it had died with the signal,
    leaving a half-written checkpoint folder)."""
    import signal
    import time

    from conftest import MICRO_CLI_SETS

    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dito_fast.cli", "train", "--preset", "dito-tiny", "--data", "synthetic",
            "--steps", "100000", "--batch-size", "2", "--image-size", "32", "--out", str(out), "--device", "cpu",
            "--set", "train.val_every_steps=0", "--set", "train.log_every_steps=1", "--set", "train.threads=1"]
    for item in MICRO_CLI_SETS:
        argv += ["--set", item]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("loss") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped early on request" in stdout and "SIGTERM: stopping after this step" in stderr
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "COMPLETE").is_file() and (out / "model" / "model.safetensors").is_file()
    assert not list((out / "checkpoints").glob(".*.tmp"))


def test_commands_take_a_half_precision_save(trained, tmp_path, capsys):
    # from_pretrained keeps the saved dtype; the commands load float32 (they feed float32 images)
    out, data, _, _ = trained
    DiTo.from_pretrained(out / "model").to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert main(["encode", str(tmp_path / "bf16"), str(data / "img0.png"), "--out", str(tmp_path / "lat")]) == 0
    assert main(["reconstruct", str(tmp_path / "bf16"), str(data / "img0.png"), "--out", str(tmp_path / "rec"),
                 "--steps", "1"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # an argparse error (exit 2), not a traceback from the generator
        main(["reconstruct", str(tmp_path / "bf16"), str(data / "img0.png"), "--out", str(tmp_path / "r2"),
              "--seed", str(2**64)])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


def test_a_closed_pipe_is_not_an_error(tmp_path):
    # `dito-fast info | head -1` had printed "error: [Errno 32] Broken pipe" (here the reader, true,
    # is gone before the command writes anything)
    proc = subprocess.run(f"{sys.executable} -m dito_fast.cli info | true", shell=True, capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.stderr == ""


def test_unknown_preset_is_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "dito-XXL", "--dry-run"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and "dito-XXL" in err


def test_missing_input_file(trained, tmp_path, capsys):
    out, _, _, _ = trained
    err = _usage_error(capsys, None, ["encode", str(out / "model"), str(tmp_path / "ghost.png"), "--out", str(tmp_path / "o")])
    assert "input not found" in err and "ghost.png" in err
    err = _usage_error(capsys, None, ["decode", str(out / "model"), str(tmp_path / "ghost.safetensors"), "--out", str(tmp_path / "o")])
    assert "latent file not found" in err
    save_file({"z": torch.zeros(1)}, str(tmp_path / "wrong.safetensors"))
    err = _usage_error(capsys, None, ["decode", str(out / "model"), str(tmp_path / "wrong.safetensors"), "--out", str(tmp_path / "o")])
    assert "no 'latent' tensor" in err
    (tmp_path / "empty").mkdir()
    err = _usage_error(capsys, None, ["encode", str(out / "model"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")])
    assert "no image files" in err
    img = _write_images(tmp_path / "imgs", n=1)[0]
    err = _usage_error(capsys, None, ["encode", str(out / "model"), str(img), "--size", "30", "--out", str(tmp_path / "o")])
    assert "--size must be a positive multiple of 8 (the model's downsampling), got 30" in err
    for bad in ("0", "-8"):  # had passed the check and made every image "unreadable"
        err = _usage_error(capsys, None, ["encode", str(out / "model"), str(img), "--size", bad, "--out", str(tmp_path / "o")])
        assert f"got {bad}" in err


def test_bad_train_settings(capsys):
    err = _usage_error(capsys, None, ["train", "--preset", "dito-tiny", "--dry-run", "--set", "train.lr"])
    assert "key=value" in err
    err = _usage_error(capsys, None, ["train", "--preset", "dito-tiny", "--dry-run", "--set", "train.nonsense=1"])
    assert "unknown config key" in err and "nonsense" in err
    err = _usage_error(capsys, None, ["train", "--preset", "dito-tiny", "--dry-run", "--set", "train.steps=many"])
    assert "cannot use 'many'" in err
    err = _usage_error(capsys, None, ["train", "--preset", "dito-tiny", "--dry-run", "--image-size", "36"])
    assert "multiple of 8" in err
    err = _usage_error(capsys, None, ["train", "--preset", "dito-tiny", "--dry-run", "--config", "/nonexistent/c.json"])
    assert "config file not found" in err


def test_python_m_dito_fast_train_dry_run():
    proc = subprocess.run([sys.executable, "-m", "dito_fast.train", "--preset", "dito-tiny", "--dry-run",
                           "--no-keep-freed-memory", "--steps", "3", "--set", "model.flow.objective=x0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads(proc.stdout)
    assert cfg["train"]["steps"] == 3 and cfg["model"]["flow"]["objective"] == "x0"
    bad = subprocess.run([sys.executable, "-m", "dito_fast.train", "--preset", "nope", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_encode_skip_existing_ranks_read_a_share_of_the_headers_each(tmp_path, monkeypatch):
    """Under torchrun each rank reads the headers of every WORLD_SIZE-th existing output only (not
    all of them: 1.28 M files for ImageNet, on a shared file system), and every rank decides
    from the pooled verdicts: rank 1 of 2 here, the other rank's verdicts handed in."""
    from dito_fast import cli
    from dito_fast.train.distributed import DistContext

    jobs = []
    for i in range(7):
        dst = tmp_path / f"{i}.safetensors"
        dst.write_bytes(b"")  # exists (its verdict comes from whichever rank reads it)
        jobs.append((tmp_path / f"{i}.png", dst))
    read = []
    monkeypatch.setattr(cli, "_encoded_differs", lambda dst, meta, shape: read.append(dst.name) or "")
    other = {0: "", 2: "was encoded with --size 32; this encode has --size 64", 4: "", 6: ""}  # rank 0's
    monkeypatch.setattr("dito_fast.train.distributed.all_gather_object", lambda mine, ctx: [other, mine])
    with pytest.raises(cli.UsageError, match=r"1 existing output file\(s\) differ.*2.safetensors was encoded with "
                                             "--size 32"):
        cli._encoded_already(jobs, lambda src: {}, (1, 4, 8, 8), False, DistContext(rank=1, world_size=2))
    assert read == ["1.safetensors", "3.safetensors", "5.safetensors"]
    todo, done = cli._encoded_already(jobs, lambda src: {}, (1, 4, 8, 8), True, DistContext(rank=1, world_size=2))
    assert [d.name for _, d in todo] == ["2.safetensors"] and done == 6
