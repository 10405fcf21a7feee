"""The embed stage against the bare model forward, and its peak memory as the crops grow.

1. Throughput: a ViT-S/16-sized Dinov2 (random weights, saved with ``save_pretrained`` and
   loaded through the stage's own code path) embeds ``--crops`` 224 px crops in
   ``--repeats`` views; the whole stage (read Parquet, decode PNG, augment, forward, write)
   is compared with the bare forward of ready float tensors of the same batch size, in
   crop-views per second, in one process run, as a ratio.
2. Memory: the stage with a tiny Dinov2 (so the pipeline, not the model, dominates) on
   2,000 and 20,000 crops, each in a fresh process; peak RSS of each.

    python benchmarks/bench_embed.py                      # both parts
    python benchmarks/bench_embed.py --skip-memory --crops 128
    python benchmarks/bench_embed.py --skip-throughput --skip-memory --heap-check
    python benchmarks/bench_embed.py --model vit-l --device cuda --bf16-check   # Phikon-v2's size, on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from histoembed.models.encoders import load_encoder

MODELS = {  # Dinov2Config arguments; Phikon-v2 is vit-l with patch 16
    "vit-tiny": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2),
    "vit-s": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4),
    "vit-l": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
}


def save_model(folder: Path, name: str) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(image_size=224, patch_size=16, **MODELS[name])
    Dinov2Model(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def write_crops(run: Path, n_crops: int, seed: int = 0, size: int = 224) -> None:
    """crops.parquet with ``n_crops`` H&E-like ``size`` px crops (16 distinct ones, cycled), row groups of 256."""
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from histoembed.core import store
    from histoembed.tools.synthetic import LABELS, tissue_image

    pngs = []
    for i in range(16):
        rgb, _ = tissue_image(np.random.default_rng([seed, i]), size, size, LABELS[i % len(LABELS)])
        pngs.append(cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes())
    schema = store.with_meta(store.CROPS_SCHEMA, {"key": f"bench-{n_crops}-{seed}-{size}"})
    run.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(run / store.CROPS_FILE, schema, compression="zstd") as writer:
        for start in range(0, n_crops, 256):
            n = min(256, n_crops - start)
            rows = range(start, start + n)
            writer.write_table(pa.table({
                "image_id": pa.array([f"img_{r // 4:05d}.png" for r in rows], pa.string()),
                "split": pa.array(["train"] * n, pa.string()),
                "label": pa.array(["A"] * n, pa.string()),
                "crop_index": pa.array([r % 4 for r in rows], pa.int32()),
                **{c: pa.array(np.zeros(n, np.int32)) for c in ("x0", "y0", "x1", "y1")},
                "tissue_fraction": pa.array(np.ones(n, np.float32)),
                "strategy": pa.array(["blobs"] * n, pa.string()),
                "scale": pa.array(np.ones(n, np.float32)),
                "png": pa.array([pngs[r % 16] for r in rows], pa.binary()),
            }, schema=schema))


def throughput(model: Path, n_crops: int, repeats: int, batch_size: int, workers: int, device: str) -> dict:
    import torch

    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.stages.embed import run_embed

    settings = EmbedSettings(encoder=str(model), repeats=repeats, batch_size=batch_size, workers=workers,
                             device=device)
    encoder = load_encoder(str(model), device=device, precision=settings.precision)
    x = torch.rand(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(encoder.device)
    encoder(x)  # warm-up
    batches = max(2, n_crops * repeats // batch_size)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(batches):
        encoder(x)
    sync()
    bare = batches * batch_size / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_crops(run, n_crops)
        start = time.perf_counter()
        result = run_embed(run, settings, AugmentSettings(), encoder=encoder)
        stage = result.new_rows / (time.perf_counter() - start)
    return {"bare_views_per_s": bare, "stage_views_per_s": stage, "ratio": stage / bare,
            "threads": torch.get_num_threads(), "device": str(encoder.device), "precision": encoder.precision}


def bf16_cosine(model: Path, device: str, n: int = 32) -> float:
    """Smallest cosine between bf16-autocast and fp32 features of the same crops."""
    import torch

    x = torch.rand(n, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    fp32 = load_encoder(str(model), device=device, precision="fp32")(x)
    bf16 = load_encoder(str(model), device=device, precision="bf16")(x)
    return float(torch.nn.functional.cosine_similarity(fp32, bf16).min())


def bare_child(model: str, batch_sizes: list[int], n: int = 128) -> None:
    """Runs in a fresh process: bare forward crops/s of ``model`` at each batch size, as JSON."""
    import torch

    enc = load_encoder(model)
    out = {}
    for bs in batch_sizes:
        x = torch.rand(bs, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        enc(x)
        start, done = time.perf_counter(), 0
        while done < n:
            enc(x)
            done += bs
        out[bs] = done / (time.perf_counter() - start)
    print(json.dumps(out))


def heap_check(tmp: Path, batch_sizes: list[int]) -> None:
    """Bare forward with and without ``keep_large_buffers_in_heap``, each in a fresh process."""
    models = {"efficientnet-lite0": "efficientnet-lite0", "vit-s": str(save_model(tmp / "heap-vit-s", "vit-s"))}
    print("bare forward crops/s, glibc heap tuning off -> on (HISTOEMBED_MALLOC_TUNING=0/1):")
    for name, model in models.items():
        rates = {}
        for tuning in ("0", "1"):
            env = {**os.environ, "HISTOEMBED_MALLOC_TUNING": tuning}
            out = subprocess.run([sys.executable, __file__, "--bare-child", model, *map(str, batch_sizes)],
                                 capture_output=True, text=True, check=True, env=env)
            rates[tuning] = json.loads(out.stdout.strip().splitlines()[-1])
        cells = ", ".join(f"batch {bs}: {rates['0'][str(bs)]:.1f} -> {rates['1'][str(bs)]:.1f}" for bs in batch_sizes)
        print(f"  {name:18s} {cells}")


def vm_hwm_mib() -> float:
    """This process's peak RSS. Unlike ru_maxrss, VmHWM starts afresh at exec, so a large parent
    (the throughput part) does not leak into the child's figure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_child(model: Path, n_crops: int, workers: int) -> None:
    """Runs in a fresh process: prints the stage's peak RSS (MiB) as JSON."""
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.stages.embed import run_embed

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp)
        write_crops(run, n_crops)
        before = vm_hwm_mib()
        start = time.perf_counter()
        settings = EmbedSettings(encoder=str(model), repeats=1, batch_size=64, workers=workers, device="cpu")
        result = run_embed(run, settings, AugmentSettings())
        seconds = time.perf_counter() - start
    own = vm_hwm_mib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"crops": n_crops, "rows": result.new_rows, "seconds": seconds,
                      "rss_before_stage_mib": before, "peak_rss_mib": own, "peak_worker_rss_mib": kids}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(MODELS), default="vit-s", help="Model size for the throughput part.")
    ap.add_argument("--crops", type=int, default=256, help="Crops in the throughput part.")
    ap.add_argument("--repeats", type=int, default=4, help="Views per crop.")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="Decoding processes.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-crops", type=int, nargs="*", default=[2000, 20000])
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--bf16-check", action="store_true", help="Also compare bf16-autocast with fp32 features.")
    ap.add_argument("--heap-check", action="store_true",
                    help="Also time the bare forward with and without the glibc heap tuning.")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--bare-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        peak_rss_child(Path(args.child[0]), int(args.child[1]), int(args.child[2]))
        return
    if args.bare_child:
        bare_child(args.bare_child[0], [int(b) for b in args.bare_child[1:]])
        return
    with tempfile.TemporaryDirectory() as tmp:
        if not args.skip_throughput:
            model = save_model(Path(tmp) / args.model, args.model)
            r = throughput(model, args.crops, args.repeats, args.batch_size, args.workers, args.device)
            print(f"{args.model}, {args.crops} crops x {args.repeats} views, batch {args.batch_size}, "
                  f"{args.workers} decode workers, {r['threads']} torch threads, {r['device']} {r['precision']}:")
            print(f"  bare forward on ready tensors: {r['bare_views_per_s']:8.1f} crop-views/s")
            print(f"  whole embed stage:             {r['stage_views_per_s']:8.1f} crop-views/s")
            print(f"  stage / bare forward:          {r['ratio']:8.1%}")
            if args.bf16_check:
                print(f"  bf16 vs fp32 features, smallest cosine over 32 crops: "
                      f"{bf16_cosine(model, args.device):.5f}")
        if args.heap_check:
            heap_check(Path(tmp), [16, 64])
        if not args.skip_memory:
            tiny = save_model(Path(tmp) / "vit-tiny", "vit-tiny")
            print("peak memory of the stage (tiny Dinov2, 1 view, each run in a fresh process):")
            for n in args.memory_crops:
                out = subprocess.run([sys.executable, __file__, "--child", str(tiny), str(n), str(args.workers)],
                                     capture_output=True, text=True, check=True)
                m = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"  {n:6d} crops: peak RSS {m['peak_rss_mib']:7.1f} MiB (before the stage "
                      f"{m['rss_before_stage_mib']:.1f}), decode workers {m['peak_worker_rss_mib']:.1f} MiB, "
                      f"{m['rows'] / m['seconds']:.0f} crops/s")


if __name__ == "__main__":
    main()
