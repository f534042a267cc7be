"""Tests for dito_fast/eval/evaluate.py and `dito-fast evaluate`: reconstruction metrics over an
image set."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dito_fast.decode import fast_decode
from dito_fast.models.dito import DiTo
from dito_fast.eval.evaluate import evaluate_reconstruction, image_batches
from dito_fast.eval.fid import FeatureStats, InceptionFeatures, frechet_distance
from dito_fast.eval.lpips import LPIPS
from dito_fast.eval.metrics import psnr, ssim
from dito_fast.eval.report import to_uint8


def _as_8bit(x):
    return to_uint8(x).float() / 127.5 - 1


def _write_images(folder, n, size=40):
    g = torch.Generator().manual_seed(5)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = (torch.rand(size, size + 8, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(folder / f"img{i}.png")


def _inception_with_spread(seed: int = 0) -> InceptionFeatures:
    """Random FID network weights that keep the activations' scale (He initialisation): the
    default initialisation shrinks the features to ~1e-7, where every FID prints as 0."""
    torch.manual_seed(seed)
    net = InceptionFeatures()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.normal_(0, (2 / m.weight[0].numel()) ** 0.5)
    return net


def test_metrics_match_a_direct_computation_and_not_the_batch_size(micro_model, images):
    options = dict(sampler="euler", steps=3)
    one, _ = evaluate_reconstruction(micro_model, [images[:1], images[1:]], seed=7, **options)
    all_at_once, _ = evaluate_reconstruction(micro_model, [images], seed=7, **options)
    # image i's noise is seeded with seed + i whatever the batches
    assert [r["psnr"] for r in one.per_image] == pytest.approx([r["psnr"] for r in all_at_once.per_image], rel=1e-6)
    x = _as_8bit(images)
    with torch.inference_mode():
        recon = _as_8bit(fast_decode(micro_model, micro_model.encode(x), seed=[7, 8, 9], output="float", **options))
    assert [r["psnr"] for r in all_at_once.per_image] == pytest.approx(psnr(recon, x).tolist(), rel=1e-6)
    assert [r["ssim"] for r in all_at_once.per_image] == pytest.approx(ssim(recon, x).tolist(), rel=1e-6)
    assert [r["index"] for r in all_at_once.per_image] == [0, 1, 2]
    assert all_at_once.psnr == pytest.approx(float(psnr(recon, x).mean()), rel=1e-6)
    assert all_at_once.ssim == pytest.approx(float(ssim(recon, x).mean()), rel=1e-6)
    assert all_at_once.num_images == 3 and all_at_once.rfid is None and all_at_once.lpips is None
    assert all_at_once.settings["sampler"] == "euler" and all_at_once.settings["nfe"] == 3
    assert all_at_once.settings["image_size"] == [[32, 32]]
    # (indices, batch) pairs: image i seeded with seed + i, its figures under its index
    shuffled, _ = evaluate_reconstruction(micro_model, [([2, 0], images[[2, 0]]), ([1], images[1:2])], seed=7,
                                          **options)
    assert [r["index"] for r in shuffled.per_image] == [0, 1, 2]  # by index
    assert [r["psnr"] for r in shuffled.per_image] == pytest.approx([r["psnr"] for r in all_at_once.per_image],
                                                                    rel=1e-6)
    # seeds wrap modulo 2^64 (2^64 - 1 + 1 had raised on the second image)
    wrapped, _ = evaluate_reconstruction(micro_model, [images[:2]], seed=2**64 - 1, **options)
    direct, _ = evaluate_reconstruction(micro_model, [([0], images[1:2])], seed=0, **options)  # seed 0 too
    assert wrapped.per_image[1]["psnr"] == pytest.approx(direct.per_image[0]["psnr"], rel=1e-6)
    # several processes need indices: plain batches would be numbered alike on every rank
    from dito_fast.train.distributed import DistContext

    with pytest.raises(ValueError, match=r"give \(indices, batch\) pairs"):
        evaluate_reconstruction(micro_model, [images], ctx=DistContext(rank=0, world_size=2, backend="gloo"),
                                **options)


def test_rfid_and_lpips(micro_model, images):
    torch.manual_seed(0)
    net, lpips = InceptionFeatures(), LPIPS()
    report, real = evaluate_reconstruction(micro_model, [images[:2], images[2:]], features=net, lpips=lpips,
                                           sampler="euler", steps=2)
    x = _as_8bit(images)
    with torch.inference_mode():
        recon = _as_8bit(fast_decode(micro_model, micro_model.encode(x), seed=[0, 1, 2], sampler="euler", steps=2,
                                     output="float"))
        fx, fr = net(x), net(recon)
        distances = lpips(recon, x)
    # batches of 2 + 1 images against 3 at once: the same up to float32 rounding, which depends on
    # the batch (with the reference ops too: the micro model's latents and decodes differ by ~1e-6
    # between batches of 3 and 1), and LPIPS's small distances magnify (5.4e-5 relative here)
    assert [r["lpips"] for r in report.per_image] == pytest.approx(distances.tolist(), rel=2e-4)
    assert report.lpips == pytest.approx(float(distances.double().mean()), rel=2e-4)
    fake = FeatureStats()
    fake.update(fr)
    assert real.n == 3 and torch.allclose(real.mean, fx.double().mean(0), atol=1e-6)
    assert report.rfid == pytest.approx(frechet_distance(fake.mean, fake.cov, real.mean, real.cov), rel=1e-4)
    assert report.rfid > 0
    wrong = FeatureStats(64)
    wrong.update(torch.randn(3, 64))
    with pytest.raises(ValueError, match="64-dimensional features, the FID network's are 2048"):
        evaluate_reconstruction(micro_model, [images], features=net, reference=wrong)  # before any decoding
    # against reference statistics given: the same value when they are the originals'
    again, none = evaluate_reconstruction(micro_model, [images], features=net, reference=real, sampler="euler",
                                          steps=2)
    assert none is None and again.rfid == pytest.approx(report.rfid, rel=1e-4)
    assert report.settings["rfid_against"] == "originals" and again.settings["rfid_against"] == "reference"
    real.update(torch.zeros(1, 2048))  # the statistics returned are ordinary tensors (not inference-mode ones)
    assert real.n == 4


def test_image_batches_reads_each_file_once_and_counts_unreadable_ones(tmp_path):
    _write_images(tmp_path / "set" / "sub", 3)
    (tmp_path / "set" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    skipped = []
    assert len(image_batches(tmp_path / "set", 32, 2)) == 4 and len(image_batches(tmp_path / "set", 32, 2,
                                                                                   rank=1, world_size=3)) == 1
    batches = list(image_batches(tmp_path / "set", 32, 2, skipped=skipped))
    # broken.jpg comes first in the sorted list; the other three are read once each, center-cropped
    assert [(i, b.shape) for i, b in batches] == [([1], (1, 3, 32, 32)), ([2, 3], (2, 3, 32, 32))]
    assert len(skipped) == 1 and skipped[0].endswith("broken.jpg")
    # a progress bar over len() ends full: the unreadable file lowers its total
    import io

    from tqdm import tqdm

    counted = image_batches(tmp_path / "set", 32, 2)
    with tqdm(total=len(counted), file=io.StringIO()) as bar:
        counted.progress = bar
        for _, b in counted:
            bar.update(b.shape[0])
        assert bar.n == bar.total == 3
    assert sum(b.shape[0] for _, b in image_batches(tmp_path / "set", 32, 8, limit=2)) == 1  # limit counts files
    # rank 1 of 2: images 1 and 3
    share = list(image_batches(tmp_path / "set", 32, 8, rank=1, world_size=2))
    assert [i for i, _ in share] == [[1, 3]] and torch.equal(share[0][1], torch.cat([batches[0][1], batches[1][1][1:]]))
    builtin = list(image_batches("builtin", 16, 4, limit=6))
    assert [b.shape[0] for _, b in builtin] == [4, 2] and all(b.abs().max() <= 1 for _, b in builtin)
    with pytest.raises(ValueError, match="neither a folder nor 'builtin' or 'synthetic'"):
        image_batches(tmp_path / "nowhere", 32, 2)
    with pytest.raises(ValueError, match="batch_size must be positive"):
        image_batches("builtin", 32, 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        image_batches(tmp_path / "empty", 32, 2)


def test_evaluate_command(tmp_path, micro_model, capsys):
    from conftest import cli_usage_error

    from dito_fast.cli import main

    micro_model.save_pretrained(tmp_path / "model")
    _write_images(tmp_path / "set", 3)
    torch.manual_seed(0)
    weights = tmp_path / "inception.safetensors"
    from safetensors.torch import save_file

    save_file(dict(InceptionFeatures().state_dict()), str(weights))
    lpips = LPIPS()
    save_file({k: v for k, v in lpips.state_dict().items() if k.startswith("features.")},
              str(tmp_path / "vgg.safetensors"))
    save_file({f"lin{k}.model.1.weight": lpips.state_dict()[f"lin{k}.weight"] for k in range(5)},
              str(tmp_path / "lin.safetensors"))
    argv = ["evaluate", str(tmp_path / "model"), str(tmp_path / "set"), "--size", "32", "--batch-size", "2",
            "--sampler", "euler", "--steps", "2", "--fid-weights", str(weights), "--json", str(tmp_path / "r.json")]
    assert main(argv + ["--save-stats", str(tmp_path / "stats.safetensors"), "--lpips",
                        str(tmp_path / "vgg.safetensors"), str(tmp_path / "lin.safetensors")]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert out.startswith(f"3 images: PSNR {report['psnr']:.2f} dB, SSIM {report['ssim']:.4f}, "
                          f"LPIPS {report['lpips']:.4f}, rFID {report['rfid']:.3f}")
    assert len(report["per_image"]) == 3 and report["skipped"] == []
    assert FeatureStats.load(tmp_path / "stats.safetensors").n == 3
    # --save-images: the reconstructions as PNG files, as compared (8-bit)
    assert main(argv[:-2] + ["--save-images", str(tmp_path / "recon"), "--lpips", str(tmp_path / "vgg.safetensors"),
                             str(tmp_path / "lin.safetensors")]) == 0
    assert sorted(p.name for p in (tmp_path / "recon").iterdir()) == ["img0.png", "img1.png", "img2.png"]
    saved = torch.from_numpy(np.array(Image.open(tmp_path / "recon" / "img1.png"))).permute(2, 0, 1)
    model = DiTo.from_pretrained(tmp_path / "model")
    x = _as_8bit(next(iter(image_batches(tmp_path / "set", 32, 3)))[1])
    with torch.inference_mode():
        recon = fast_decode(model, model.encode(x), seed=[0, 1, 2], sampler="euler", steps=2)
    assert torch.equal(saved, recon[1])
    assert psnr(saved[None].float() / 127.5 - 1, x[1:2]).item() == pytest.approx(report["per_image"][1]["psnr"])
    cli_usage_error(capsys, "img0.png exists already", argv[:-2] + ["--save-images", str(tmp_path / "recon")])
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "set" / "img0.jpg")
    err = cli_usage_error(capsys, "img0.jpg and " + str(tmp_path / "set" / "img0.png") + " would both be written to",
                          argv[:-2] + ["--save-images", str(tmp_path / "r2")])
    assert "--out" not in err  # (evaluate has no --out; the advice had named it)
    (tmp_path / "set" / "img0.jpg").unlink()
    cli_usage_error(capsys, "is inside the data folder", argv[:-2] + ["--save-images", str(tmp_path / "set" / "r")])
    cli_usage_error(capsys, "is a file; give a folder", argv[:-2] + ["--save-images", str(weights)])
    capsys.readouterr()
    # outputs that exist or are folders: refused before the run
    cli_usage_error(capsys, "exists already (--overwrite replaces it)", argv)
    cli_usage_error(capsys, "is a folder", argv[:-1] + [str(tmp_path)])
    cli_usage_error(capsys, "is not a writable folder", argv[:-1] + [str(weights / "r.json")])  # below a file
    cli_usage_error(capsys, "--lpips needs images of at least 16x16", argv[:3] + ["--size", "8", "--lpips", "a", "b"])
    # the saved statistics as the reference: the same rFID
    assert main(argv + ["--fid-reference", str(tmp_path / "stats.safetensors"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["rfid"] == pytest.approx(report["rfid"], rel=1e-6)
    capsys.readouterr()
    # an unreadable file is skipped and counted: exit status 1, the others evaluated
    (tmp_path / "set" / "zz.png").write_bytes(b"garbage")
    assert main(argv[:-4]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("3 images:") and "1 of 4 inputs could not be read" in captured.err
    # one image: the report is written, the statistics (no covariance) are not
    assert main(argv + ["--limit", "1", "--overwrite", "--save-stats", str(tmp_path / "one.safetensors")]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("1 image: ") and "at least 2 images, have 1" in captured.err
    assert json.loads((tmp_path / "r.json").read_text())["num_images"] == 1
    assert not (tmp_path / "one.safetensors").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    cli_usage_error(capsys, "no readable images: all 1 were skipped", [argv[0], argv[1], str(tmp_path / "bad")]
                    + argv[3:-4])
    cli_usage_error(capsys, "need --fid-weights", argv[:-4] + ["--save-stats", str(tmp_path / "s2.safetensors")])
    cli_usage_error(capsys, "--size must be a positive multiple", argv[:3] + ["--size", "30"])
    cli_usage_error(capsys, "batch_size must be positive", argv[:-4] + ["--batch-size", "0"])


@pytest.mark.slow
def test_evaluate_under_torchrun_gives_the_single_process_figures(tmp_path, micro_model):
    """2 ranks (gloo, CPU) each evaluate every other image; the gathered report and the merged
    feature statistics equal one process's (up to the decode's float rounding in other batches)."""
    import os
    import sys

    from dito_fast.testing import run_process_tree

    micro_model.save_pretrained(tmp_path / "model")
    _write_images(tmp_path / "set", 5)
    (tmp_path / "set" / "img2.png").write_bytes(b"garbage")  # rank 0's share: skipped and counted
    torch.manual_seed(0)
    from safetensors.torch import save_file

    save_file(dict(InceptionFeatures().state_dict()), str(tmp_path / "inception.safetensors"))
    args = ["evaluate", str(tmp_path / "model"), str(tmp_path / "set"), "--size", "32", "--batch-size", "2",
            "--sampler", "euler", "--steps", "2", "--fid-weights", str(tmp_path / "inception.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = run_process_tree([sys.executable, "-m", "dito_fast.cli", *args, "--json", str(tmp_path / "one.json"),
                               "--save-stats", str(tmp_path / "one.safetensors")], timeout=300, env=env)
    assert single.returncode == 1, single.stderr[-3000:]  # one file skipped
    multi = run_process_tree([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                              "-m", "dito_fast.cli", *args, "--json", str(tmp_path / "two.json"),
                              "--save-stats", str(tmp_path / "two.safetensors")], timeout=300, env=env)
    # partial under torchrun: said, but exit 0 (a non-zero worker is a failed job to torchrun, which
    # with --max-restarts would run it all again)
    assert multi.returncode == 0 and "1 of 5 inputs could not be read" in multi.stderr, multi.stderr[-3000:]
    assert multi.stdout.count(" images: PSNR") == 1  # rank 0 reports
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert [r["index"] for r in two["per_image"]] == [0, 1, 3, 4] == [r["index"] for r in one["per_image"]]
    # the images are decoded in other batches: float rounding can move a pixel across an 8-bit
    # level (measured: 1.9e-6 relative on one image's PSNR)
    assert [r["psnr"] for r in two["per_image"]] == pytest.approx([r["psnr"] for r in one["per_image"]], rel=1e-4)
    assert two["rfid"] == pytest.approx(one["rfid"], rel=1e-3) and two["settings"]["processes"] == 2
    assert len(two["skipped"]) == 1 and two["skipped"][0].endswith("img2.png")
    s1, s2 = FeatureStats.load(tmp_path / "one.safetensors"), FeatureStats.load(tmp_path / "two.safetensors")
    # the originals are the same pixels in both runs: their statistics agree up to the network's
    # float32 rounding in other batch sizes (a wrong merge is off by the covariances' own size)
    assert s2.n == 4 and torch.allclose(s1.mean, s2.mean, rtol=1e-5, atol=1e-8)
    assert torch.allclose(s1.cov, s2.cov, rtol=1e-4, atol=1e-9)


def test_fid_command(tmp_path, capsys):
    from conftest import cli_usage_error
    from safetensors.torch import save_file

    from dito_fast.cli import main
    from dito_fast.eval.evaluate import image_set_stats

    _write_images(tmp_path / "a", 4)
    g = torch.Generator().manual_seed(9)
    (tmp_path / "b").mkdir()
    for i in range(3):
        arr = (torch.rand(36, 36, 3, generator=g) * 128).to(torch.uint8).numpy()  # darker images
        Image.fromarray(arr).save(tmp_path / "b" / f"{i}.png")
    net = _inception_with_spread()
    save_file(dict(net.state_dict()), str(tmp_path / "w.safetensors"))
    base = ["fid", "--fid-weights", str(tmp_path / "w.safetensors"), "--size", "32", "--batch-size", "3"]
    assert main(base + [str(tmp_path / "a"), str(tmp_path / "b"), "--save-stats", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    sa, sb = (image_set_stats(image_batches(tmp_path / k, 32, 2), net) for k in ("a", "b"))
    expected = frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)
    assert expected > 1  # (the spread weights: default ones give ~1e-14 for any two sets)
    assert out.startswith("FID ") and float(out.split()[1]) == pytest.approx(expected, abs=1e-4)
    assert "(4 vs 3 images)" in out
    # saved statistics in place of the folder: the same value; both sides statistics: no images read
    assert main(base + [str(tmp_path / "a.npz"), str(tmp_path / "b")]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(expected, abs=1e-4)
    sb.save(tmp_path / "b.safetensors")
    assert main(["fid", str(tmp_path / "a.npz"), str(tmp_path / "b.safetensors")]) == 0
    out = capsys.readouterr().out
    assert float(out.split()[1]) == pytest.approx(expected, abs=1e-4) and "(? vs 3 images)" in out
    # a set against itself: 0
    assert main(base + [str(tmp_path / "b"), str(tmp_path / "b")]) == 0
    assert abs(float(capsys.readouterr().out.split()[1])) < 1e-3
    # statistics of another network: refused before any image is read
    small = FeatureStats(64)
    small.update(torch.randn(3, 64))
    small.save(tmp_path / "small.safetensors")
    cli_usage_error(capsys, "64-dimensional features", base + [str(tmp_path / "a"), str(tmp_path / "small.safetensors")])
    cli_usage_error(capsys, "no such statistics file", base + [str(tmp_path / "a"), str(tmp_path / "typo.npz")])
    import shutil  # a folder of images that happens to be named like statistics: images
    shutil.copytree(tmp_path / "b", tmp_path / "b.npz")
    assert main(base + [str(tmp_path / "a"), str(tmp_path / "b.npz")]) == 0
    assert float(capsys.readouterr().out.split()[1]) == pytest.approx(expected, abs=1e-4)
    cli_usage_error(capsys, "needs --fid-weights and --size", ["fid", str(tmp_path / "a"), str(tmp_path / "a.npz")])
    (tmp_path / "c").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "c" / "one.png")
    cli_usage_error(capsys, "1 readable image(s); a covariance needs at least 2", base + [str(tmp_path / "c"),
                                                                                         str(tmp_path / "b")])
    cli_usage_error(capsys, "SOURCE is a statistics file", base + [str(tmp_path / "a.npz"), str(tmp_path / "b"),
                                                                   "--save-stats", str(tmp_path / "x.npz")])


def test_saved_statistics_record_their_network_and_size(tmp_path, capsys):
    """Statistics saved by `fid --save-stats` carry the Inception weights' fingerprint and the
    image size: another network's are refused (before any image is read, or when both sides
    are files), another size is warned of."""
    from conftest import cli_usage_error
    from safetensors.torch import save_file

    from dito_fast.cli import main

    _write_images(tmp_path / "a", 4)
    _write_images(tmp_path / "b", 3)
    for k, seed in ((1, 0), (2, 1)):
        save_file(dict(_inception_with_spread(seed).state_dict()), str(tmp_path / f"w{k}.safetensors"))
    base = ["--batch-size", "4"]
    w1, w2 = (["--fid-weights", str(tmp_path / f"w{k}.safetensors")] for k in (1, 2))
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--size", "32", *w1, *base,
                 "--save-stats", str(tmp_path / "a.safetensors")]) == 0
    saved = FeatureStats.load(tmp_path / "a.safetensors")
    assert saved.info == {"network": InceptionFeatures.from_file(tmp_path / "w1.safetensors").fingerprint(),
                          "size": "32"}
    assert main(["fid", str(tmp_path / "b"), str(tmp_path / "b"), "--size", "32", *w2, *base,
                 "--save-stats", str(tmp_path / "b2.safetensors")]) == 0
    capsys.readouterr()
    cli_usage_error(capsys, "different Inception weights", ["fid", str(tmp_path / "b"), str(tmp_path / "a.safetensors"),
                                                            "--size", "32", *w2, *base])
    cli_usage_error(capsys, "different Inception weights", ["fid", str(tmp_path / "b2.safetensors"),
                                                            str(tmp_path / "a.safetensors")])
    assert main(["fid", str(tmp_path / "b"), str(tmp_path / "a.safetensors"), "--size", "40", *w1, *base]) == 0
    assert "different image sizes (--size) (size 32 and 40)" in capsys.readouterr().err
    assert main(["fid", str(tmp_path / "b"), str(tmp_path / "a.safetensors"), "--size", "32", *w1, *base]) == 0
    assert "warning" not in capsys.readouterr().err
    # a mistyped image folder is said before the network is loaded (here: before its missing file is)
    cli_usage_error(capsys, "image source", ["fid", str(tmp_path / "nope"), str(tmp_path / "a.safetensors"),
                                             "--size", "32", "--fid-weights", str(tmp_path / "missing.pth")])


def test_images_in_another_range_are_refused(micro_model, images):
    """Images in 0..255 (or uint8, fast_decode's default output) given where [-1, 1] is meant:
    LPIPS and the FID network had computed plausible figures from them, and
    evaluate_reconstruction / image_set_stats had clamped them to white first."""
    from dito_fast.eval.evaluate import image_set_stats

    net, lp = InceptionFeatures(), LPIPS()
    x = images[:2]
    for bad, error in ((x * 127.5 + 127.5, ValueError), (to_uint8(x), TypeError)):
        with pytest.raises(error, match=r"LPIPS: x must be"):
            lp(bad, x)
        with pytest.raises(error, match=r"InceptionFeatures: x must be"):
            net(bad)
        with pytest.raises(error, match=r"evaluate_reconstruction: images must be"):
            evaluate_reconstruction(micro_model, [bad], steps=1)
        with pytest.raises(error, match=r"image_set_stats: images must be"):
            image_set_stats([bad], net)
    assert lp(x * 1.01, x).shape == (2,)  # a network's slight overshoot is accepted
