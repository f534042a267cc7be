"""Print the op, model and data-loading benchmark tables from a pytest-benchmark JSON file (markdown).

Usage: python benchmarks/report.py BENCH.json
Ratios are between providers measured in the same run (same file).
"""

from __future__ import annotations

import json
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    if "benchmarks" not in data:
        raise SystemExit(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' list)")
    rows = data["benchmarks"]
    threads = {r["extra_info"].get("threads") for r in rows}
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}; threads: {sorted(t for t in threads if t)}; "
          f"torch {rows[0]['extra_info'].get('torch', '?') if rows else '?'}")
    bw = next((r["extra_info"].get("gb_per_s") for r in rows if r["name"].startswith("test_memory_bandwidth")), None)
    if bw:
        print(f"measured copy bandwidth: {bw:.1f} GB/s\n")
    ops, convs = defaultdict(dict), defaultdict(dict)
    for r in rows:
        p = r.get("params") or {}
        if "provider" in p and "mode" in p:
            shape = r["extra_info"].get("shape", p.get("shape"))
            shape = tuple(shape) if isinstance(shape, list) else shape  # older rows: the shape parameter itself
            key = (r["name"].split("[")[0].removeprefix("test_"), shape, p["mode"])
            target = convs if key[0] == "conv3x3" else ops
            target[key][p["provider"]] = r["stats"]["median"] * 1e3, r["extra_info"].get(
                "gflops" if key[0] == "conv3x3" else "gb_per_s")
            target[key]["min_bytes"] = r["extra_info"].get("min_bytes")
    if ops:
        # "ref / bw-bound": how many times faster than eager a kernel moving only its minimum traffic
        # at the measured (DRAM) copy bandwidth would be; below 3 no kernel whose data comes from
        # memory can be 3x faster than eager. Rows whose data fits in the caches (the small levels,
        # the latents) beat that bound, and their "GB/s" exceed the copy bandwidth: effective
        # rates, not memory traffic. These rows run one provider after another (not alternated).
        print("| op | shape | mode | ref ms | compile ms | cpp ms | cpp vs ref | cpp vs compile | cpp GB/s (min traffic) "
              "| ref / bw-bound |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for (op, shape, mode), prov in sorted(ops.items()):
            ref, comp, cpp = (prov.get(k, (None, None)) for k in ("ref", "compile", "cpp"))  # (ms, GB/s)
            fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
            ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b is not None else "-"  # noqa: E731
            gbs = f"{cpp[1]:.1f}" + (f" ({cpp[1] / bw:.0%})" if bw and cpp[1] else "") if cpp[1] else "-"
            nbytes = prov.get("min_bytes")
            bound = f"{ref[0] / (nbytes / bw / 1e6):.1f}x" if bw and nbytes and ref[0] else "-"
            print(f"| {op} | {shape} | {mode} | {fmt(ref[0])} | {fmt(comp[0])} | {fmt(cpp[0])} | "
                  f"{ratio(ref[0], cpp[0])} | {ratio(comp[0], cpp[0])} | {gbs} | {bound} |")
    if convs:
        # GFLOP/s are nominal: the direct algorithm's 2 x multiply-adds over the time, so Winograd
        # (2.25x fewer multiply-adds) can exceed the machine's GEMM rate.
        print("\n| 3x3 conv (channels_last) | shape | mode | ref ms | compile ms | cpp (Winograd) ms | cpp vs ref "
              "| cpp vs compile | ref GFLOP/s | cpp GFLOP/s (nominal) |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for (op, shape, mode), prov in sorted(convs.items()):
            ref, comp, cpp = (prov.get(k, (None, None)) for k in ("ref", "compile", "cpp"))
            fmt = lambda v, d=3: f"{v:.{d}f}" if v is not None else "-"  # noqa: E731
            ratio = lambda a, b: f"{a / b:.2f}x" if a is not None and b is not None else "-"  # noqa: E731
            print(f"| {op} | {shape} | {mode} | {fmt(ref[0])} | {fmt(comp[0])} | {fmt(cpp[0])} | {ratio(ref[0], cpp[0])} "
                  f"| {ratio(comp[0], cpp[0])} | {fmt(ref[1], 0)} | {fmt(cpp[1], 0)} |")
    tiles = [r["extra_info"] for r in rows if r["name"].startswith("test_winograd_tiles") and "tile4_ms" in r["extra_info"]]
    if tiles:
        print("\n| Winograd tiles (alternated) | shape | mode | F(2x2) ms | F(4x4) ms | F(4x4) speed-up | automatic choice |")
        print("|---|---|---|---:|---:|---:|---:|")
        for e in sorted(tiles, key=lambda e: (e["shape"], e["mode"])):
            print(f"| conv3x3 | {e['shape']} | {e['mode']} | {e['tile2_ms']:.3f} | {e['tile4_ms']:.3f} | "
                  f"{e['tile4_speedup']:.2f}x | F({e['auto_tile']}x{e['auto_tile']}) |")
    inter = [r["extra_info"] for r in rows if r["name"].startswith("test_interleaved_ratio") and "speedup" in r["extra_info"]]
    if inter:
        # eager: the op as plain PyTorch (the reference less its input checks and casts; runs
        # from 2026-12-04 on)
        print("\n| op (providers timed in alternation) | shape | mode | ref ms | eager ms | compile ms | cpp ms "
              "| cpp vs ref | cpp vs eager | cpp vs compile |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
        for e in sorted(inter, key=lambda e: (e["op"], e["shape"], e["mode"])):
            comp = f"{e['compile_ms']:.3f}" if "compile_ms" in e else "-"
            vs = f"{e['speedup_vs_compile']:.2f}x" if "speedup_vs_compile" in e else "-"
            eager = f"{e['eager_ms']:.3f}" if "eager_ms" in e else "-"
            vs_eager = f"{e['speedup_vs_eager']:.2f}x" if "speedup_vs_eager" in e else "-"
            print(f"| {e['op']} | {e['shape']} | {e['mode']} | {e['ref_ms']:.3f} | {eager} | {comp} | {e['cpp_ms']:.3f} | "
                  f"{e['speedup']:.2f}x | {vs_eager} | {vs} |")
        floors = [e for e in inter if "floor_ms" in e]
        if floors:
            # The floor: one differentiable ATen op (x * 1) on the same input in the same rounds;
            # ref / floor roughly bounds the ratio a single-op implementation could show here.
            print("\n| one-op floor (alternated) | shape | mode | floor ms | cpp ms | ref ms | cpp / floor "
                  "| cpp vs ref | ceiling: ref / floor |")
            print("|---|---|---|---:|---:|---:|---:|---:|---:|")
            for e in sorted(floors, key=lambda e: (e["op"], e["shape"], e["mode"])):
                print(f"| {e['op']} | {e['shape']} | {e['mode']} | {e['floor_ms']:.3f} | {e['cpp_ms']:.3f} | "
                      f"{e['ref_ms']:.3f} | {e['cpp_ms'] / e['floor_ms']:.2f} | {e['speedup']:.2f}x | "
                      f"{e['ref_vs_floor']:.2f}x |")
        net = [e for e in inter if "standin_ms" in e]
        if net:
            # The flow-matching ops alone: each step time above less the stand-in's forward,
            # timed in the same alternation. The compiled step fuses the stand-in's add into its
            # loss kernel, so it never pays the eager add subtracted here: its net time is
            # understated by about one elementwise pass, and "cpp vs compile" with it (against cpp).
            print("\n| flow-matching ops, net of the stand-in | shape | mode | stand-in ms | ref ms | eager ms "
                  "| compile ms | cpp ms | cpp vs ref | cpp vs eager | cpp vs compile | gross: cpp vs ref |")
            print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for e in sorted(net, key=lambda e: (e["shape"], e["mode"])):
                sd = e["standin_ms"]
                comp = f"{e['compile_ms'] - sd:.3f}" if "compile_ms" in e else "-"
                vs = f"{e['speedup_vs_compile_net']:.2f}x" if "speedup_vs_compile_net" in e else "-"
                eager = f"{e['eager_ms'] - sd:.3f}" if "eager_ms" in e else "-"
                vs_eager = f"{e['speedup_vs_eager_net']:.2f}x" if "speedup_vs_eager_net" in e else "-"
                print(f"| {e['op']} | {e['shape']} | {e['mode']} | {sd:.3f} | {e['ref_ms'] - sd:.3f} | {eager} | {comp} | "
                      f"{e['cpp_ms'] - sd:.3f} | {e['speedup_net']:.2f}x | {vs_eager} | {vs} | {e['speedup']:.2f}x |")
    routes = [r["extra_info"] for r in rows if "boxed_ms" in r["extra_info"]]
    if routes:
        # The cpp provider with and without the dispatcher's direct route, in the same rounds; the
        # flow-matching rows net of the stand-in's forward, as in their own table.
        print("\n| call route (alternated) | shape | mode | ref ms | direct route ms | torch.ops route ms "
              "| saving us | cpp vs ref, direct | cpp vs ref, torch.ops |")
        print("|---|---|---|---:|---:|---:|---:|---:|---:|")
        for e in sorted(routes, key=lambda e: (e["op"], e["mode"])):
            sd = e.get("standin_ms", 0.0)
            ref, cpp, boxed = e["ref_ms"] - sd, e["cpp_ms"] - sd, e["boxed_ms"] - sd
            op = e["op"] + (" (net)" if sd else "")
            print(f"| {op} | {e['shape']} | {e['mode']} | {ref:.3f} | {cpp:.3f} | {boxed:.3f} | "
                  f"{e['saving_us']:.0f} | {ref / cpp:.2f}x | {ref / boxed:.2f}x |")
    chained = [r["extra_info"] for r in rows if r["name"].startswith("test_chained_ratio") and "ref_ms_per_call" in r["extra_info"]]
    if chained:
        # Forward+backward of a chain of calls with one backward pass (alternated), per call.
        print(f"\n| chained, {chained[0]['chain']} calls, one backward (alternated) | shape | mode | ref ms per call "
              "| cpp ms per call | cpp vs ref |")
        print("|---|---|---|---:|---:|---:|")
        for e in sorted(chained, key=lambda e: (e["op"], e["shape"])):
            print(f"| {e['op']} | {e['shape']} | {e['mode']} | {e['ref_ms_per_call']:.3f} | {e['cpp_ms_per_call']:.3f} | "
                  f"{e['speedup']:.2f}x |")
    bias = [r["extra_info"] for r in rows if r["name"].startswith("test_interleaving_order_bias")]
    if bias:
        # The same cpp call timed at two places of one fixed order (why the rounds are shuffled).
        print("\n| order bias, one fixed order | shape | mode | cpp ms, right after | after the floor | ratio |")
        print("|---|---|---|---:|---:|---:|")
        for e in sorted(bias, key=lambda e: e["mode"]):
            print(f"| {e['op']} | {e['shape']} | {e['mode']} | {e['cpp_ms_after_it']:.3f} (after {e['cpp_after']}) | "
                  f"{e['cpp_ms_after_floor']:.3f} | {e['position_ratio']:.2f} |")
    prof = [r for r in rows if r["name"].startswith("test_profile_fused_share")]
    if prof:
        first = prof[0]["extra_info"]
        print(f"\n| {first.get('model', 'dito-S')} @{first.get('image_size', 64)}, batch {first.get('batch', 8)} | reference ms | fused, NCHW in/out ms | fused, channels_last ms | norm ops share "
              "| 3x3 conv share | ideal speed-up | achieved (channels_last) | achieved (NCHW in/out) | saving vs ideal |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in prof:
            e = r["extra_info"]
            # runs before 2026-12-02 had no NCHW in/out variant
            nchw, nchw_x = e.get("fused_nchw_step_ms"), e.get("achieved_speedup_nchw")
            print(f"| {e['kind']} | {e['ref_step_ms']:.0f} | {'-' if nchw is None else f'{nchw:.0f}'} | "
                  f"{e['fused_step_ms']:.0f} | {e.get('norm_ops_share', e.get('replaced_share', 0)):.1%} | {_pct(e.get('conv3x3_share'))} | "
                  f"{e['ideal_speedup']:.2f}x | {e['achieved_speedup']:.2f}x | "
                  f"{'-' if nchw_x is None else f'{nchw_x:.2f}x'} | {e['saving_vs_ideal']:.0%} |")
    mem = [r["extra_info"] for r in rows if r["name"].startswith("test_train_peak_memory") and "kept_peak_mib" in r["extra_info"]]
    if mem:
        print("\n| training step, 3x3 conv filters (fresh processes) | peak MiB | step's increase MiB | step s |")
        print("|---|---:|---:|---:|")
        for e in mem:
            for k, label in (("kept", "kept for the backward"), ("recomputed", "transformed again in the backward")):
                print(f"| {e['preset']} @{e['image_size']}, batch {e['batch']}: {label} | {e[k + '_peak_mib']:.0f} | "
                      f"{e[k + '_step_mib']:.0f} | {e[k + '_step_s']:.2f} |")
    cl = [{"kind": f"fast_decode ({r['extra_info']['steps']} Euler steps)", **r["extra_info"]}
          if r["name"].startswith("test_decode_channels_last") else r["extra_info"]
          for r in rows if r["name"].startswith(("test_channels_last", "test_decode_channels_last"))
          and "nchw_ms" in r["extra_info"]]
    if cl:
        print("\n| dito-S @64, batch 8, fused ops | NCHW ms | channels_last ms | speed-up |")
        print("|---|---:|---:|---:|")
        for e in cl:
            print(f"| {e['kind']} | {e['nchw_ms']:.0f} | {e['channels_last_ms']:.0f} | {e['channels_last_speedup']:.3f}x |")
    opt = next((r["extra_info"] for r in rows if r["name"].startswith("test_optimizer_step_layout")
                and "contiguous_ms" in r["extra_info"]), None)
    if opt:
        print("\n| fused AdamW step, dito-S parameters (alternated) | contiguous ms | channels_last ms | speed-up |")
        print("|---|---:|---:|---:|")
        print(f"| 4-d parameters contiguous vs channels_last | {opt['contiguous_ms']:.1f} | "
              f"{opt['channels_last_ms']:.1f} | {opt['contiguous_speedup']:.2f}x |")
    model = [r for r in rows if r["name"].startswith(("test_train_step[", "test_decoder_step", "test_encode"))]
    if model:
        print("\n| model benchmark | median ms | derived |")
        print("|---|---:|---|")
        for r in model:
            ei = {k: v for k, v in r["extra_info"].items() if k not in ("threads", "torch", "memory_reused")}
            derived = ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in ei.items())
            print(f"| {r['name']} | {r['stats']['median'] * 1e3:.1f} | {derived} |")

    loaders = [r for r in rows if r["name"].startswith("test_loader_throughput")]
    if loaders:
        train = next((r["extra_info"].get("images_per_s") for r in rows
                      if r["name"].startswith("test_train_step_consumption")), None)
        print("\n| loader | workers/threads | crop | images/s | vs training consumption |")
        print("|---|---:|---:|---:|---:|")
        for r in loaders:
            ei = r["extra_info"]
            ips = ei.get("images_per_s")
            ratio = f"{ips / train:.0f}x" if ips and train else "-"
            name = ei.get("loader", "?") + (" (default)" if ei.get("default") else "")
            print(f"| {name} | {ei.get('workers')} | {ei.get('crop')} | "
                  f"{ips:.0f} | {ratio} |" if ips else f"| {name} | {ei.get('workers')} | {ei.get('crop')} | - | - |")
        if train:
            print(f"\ntraining consumes {train:.2f} images/s (dito-S, 64x64, batch 8)")

    latent = [r for r in rows if r["name"].startswith("test_latent_set_open")]
    if latent:
        print("\n| train-dit start (load to first batch of 256) | latents | ms | latents/s | speed-up |")
        print("|---|---:|---:|---:|---:|")
        for r in latent:
            ei = r["extra_info"]
            up = f"{ei['speedup_vs_folder']:.0f}x" if "speedup_vs_folder" in ei else "-"
            print(f"| {ei.get('form')} | {ei.get('latents')} | {r['stats']['median'] * 1e3:.1f} | "
                  f"{ei.get('latents_per_s', 0):.0f} | {up} |")

    scaling = next((r["extra_info"] for r in rows if r["name"].startswith("test_scaling_efficiency")), None)
    comm = next((r["extra_info"] for r in rows if r["name"].startswith("test_communication_share")), None)
    if scaling:
        e = scaling
        print(f"\n| data-parallel training, {e['preset']} @{e['image_size']}, global batch {e['global_batch']} "
              "| images/s | data wait s | forward s | backward s | optimizer s |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, ips, split in (("2 processes x 1 thread (DDP, gloo)", e["images_per_s_2x1"], e["step_split_s_2x1"]),
                                 ("1 process x 2 threads", e["images_per_s_1x2"], e["step_split_s_1x2"])):
            print(f"| {name} | {ips:.1f} | " + " | ".join(f"{split[k]:.3f}" for k in
                                                          ("data_wait", "forward", "backward", "optimizer")) + " |")
        print(f"\nscaling efficiency (2x1 vs 1x2): {e['scaling_efficiency']:.2f}")
    if comm:
        print(f"communication: all-reduce of {comm['grad_mb']:.1f} MiB gradients {comm['allreduce_s'] * 1e3:.1f} ms = "
              f"{comm['allreduce_share']:.1%} of a synced step ({comm['step_sync_s'] * 1e3:.0f} ms); exposed "
              f"(synced - no_sync) {comm['exposed_comm_share']:.1%}")
    decode_tables(rows)
    gpu_tables(rows)


def gpu_tables(rows) -> None:
    """bench_gpu.py's tables (the GPU rows, all variants alternated within a row)."""
    ops = [r["extra_info"] for r in rows if r["name"].startswith("test_gpu_") and "op" in r["extra_info"]
           and "ref_ms" in r["extra_info"]]
    if ops:
        fmt = lambda e, k: f"{e[k]:.4f}" if k in e else "-"  # noqa: E731
        ratio = lambda e, k: f"{e[k]:.2f}x" if k in e else "-"  # noqa: E731
        bw = next((r["extra_info"]["gb_per_s"] for r in rows if r["name"].startswith("test_gpu_memory_bandwidth")
                   and "gb_per_s" in r["extra_info"]), None)
        print(f"\nGPU: {ops[0]['gpu']}; ms per call (CUDA events, alternated)"
              + (f"; measured copy bandwidth {bw:.0f} GB/s" if bw else ""))
        print("| op | shape | dtype | mode | ref ms | compile ms | cuda ms | triton ms | cuda vs ref | triton vs ref "
              "| compile vs ref | best GB/s (min traffic) |")
        print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for e in sorted(ops, key=lambda e: (e["op"], e["shape"], e["dtype"], e["mode"])):
            best = max((e[k] for k in ("cuda_gb_per_s", "triton_gb_per_s") if k in e), default=None)
            print(f"| {e['op']} | {e['shape']} | {e['dtype']} | {e['mode']} | {fmt(e, 'ref_ms')} | {fmt(e, 'compile_ms')} "
                  f"| {fmt(e, 'cuda_ms')} | {fmt(e, 'triton_ms')} | {ratio(e, 'cuda_speedup')} | {ratio(e, 'triton_speedup')} "
                  f"| {ratio(e, 'compile_speedup')} | {'-' if best is None else f'{best:.0f}'} |")
    models = [r["extra_info"] for r in rows if r["name"].startswith("test_gpu_model") and "ref_ms" in r["extra_info"]]
    if models:
        print("\n| GPU model step (alternated) | size | batch | precision | kind | ref ms | fused ms | speed-up | images/s |")
        print("|---|---|---|---|---|---:|---:|---:|---:|")
        for e in models:
            print(f"| {e['model']} | {e['image_size']} | {e['batch']} | {e['precision']} | {e['kind']} | {e['ref_ms']:.2f} "
                  f"| {e['fused_ms']:.2f} | {e['speedup']:.2f}x | {e['images_per_s']:.0f} |")
    for r in rows:
        e = r["extra_info"]
        if r["name"].startswith("test_gpu_fast_decode") and "graph_ms" in e:
            print(f"\nfast_decode {e['model']} batch {e['batch']}, {e['steps']} steps, {e['dtype']}: eager "
                  f"{e['eager_ms']:.1f} ms, CUDA graph {e['graph_ms']:.1f} ms ({e['graph_speedup']:.2f}x, "
                  f"{e['images_per_s']:.0f} images/s)")


def decode_tables(rows) -> None:
    """fast_decode's tables (bench_decode.py's rows), printed when the run has any."""
    decode = [r["extra_info"] for r in rows if r["name"].startswith("test_decode") and "nfe" in r["extra_info"]]
    if decode:
        print("\n| preset | size | batch | mode | sampler | NFE | images/s | ms/NFE | GFLOP/s | of matmul peak | speed-up |")
        print("|---|---|---|---|---|---:|---:|---:|---:|---:|---:|")
        for e in decode:
            sp = (f"{e['speedup_vs_baseline']:.2f}x ({e['speedup_per_nfe']:.2f}x per NFE)"
                  if "speedup_vs_baseline" in e else "")
            print(f"| {e['preset']} | {e['image_size']} | {e['batch']} | {e['mode']} | {e['sampler']} {e['schedule']} "
                  f"{e['steps']} | {e['nfe']} | {e['images_per_s']:.3f} | {e['ms_per_nfe']:.1f} | "
                  f"{e['gflops_per_s']:.0f} | {e['peak_fraction']:.0%} | {sp} |")
    for r in rows:
        e = r["extra_info"]
        if r["name"].startswith("test_peak_memory") and "untiled_decode_mib" in e:
            print(f"\n{e['preset']} {e['image_size']}x{e['image_size']}, one step: untiled "
                  f"+{e['untiled_decode_mib']:.0f} MiB (peak RSS {e['untiled_peak_mib']:.0f} MiB, "
                  f"{e['untiled_step_s']:.0f} s), {e['tile']}-px tiles (overlap {e['tile_overlap']}) "
                  f"+{e['tiled_decode_mib']:.0f} MiB (peak RSS {e['tiled_peak_mib']:.0f} MiB, "
                  f"{e['tiled_step_s']:.0f} s)")
        if r["name"].startswith("test_cpu_allocator") and "keep_speedup" in e:
            print(f"\n{e['preset']} {e['image_size']}x{e['image_size']}, one decoder step: glibc default "
                  f"{e['default_step_s']:.2f} s ({e['default_faults_per_step'] / 1000:.0f}k page faults), "
                  f"keep_freed_memory {e['keep_step_s']:.2f} s ({e['keep_faults_per_step'] / 1000:.0f}k): "
                  f"{e['keep_speedup']:.2f}x")


def _pct(value) -> str:
    return "-" if value is None else f"{value:.1%}"  # "-": not recorded by that run


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Print the README's tables from a pytest-benchmark JSON file "
                                                 "(pytest benchmarks --benchmark-json=FILE).")
    parser.add_argument("json", help="a --benchmark-json file, e.g. benchmarks/results/ops_model_2026-12-03.json")
    main(parser.parse_args().json)
