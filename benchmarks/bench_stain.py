"""What Macenko stain normalisation adds to the embed stage's time, as a ratio measured in one run.

The whole embed stage (read Parquet, decode PNG, normalise, augment, forward, write) with a
ViT-S/16-sized Dinov2 (random weights, saved with ``save_pretrained`` and loaded through the
stage's own code path) on ``--crops`` 224 px H&E-like crops in ``--repeats`` views, alternately
with ``--stain-norm none`` and ``macenko`` (none, macenko, macenko, none, ...: a drift of the
machine's speed falls on both alike), each into a fresh feature store, so every Macenko run
also computes its target (the training crops' median stain). Reported: the median wall time
of each and their ratio, and the normalisation alone (one batch, on the same device) beside
the bare forward of that batch's views and beside torchstain's ``normalize`` called crop by crop.

    python benchmarks/bench_stain.py                        # 64 crops, 4 views, 2 rounds, ViT-S, CPU
    python benchmarks/bench_stain.py --crops 256 --rounds 3 --device cuda
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench_embed import save_model, write_crops  # noqa: E402  (a sibling script)


def stage_seconds(run: Path, model: Path, method: str, args) -> tuple[float, dict | None]:
    from histoembed.core import store
    from histoembed.core.config import AugmentSettings, EmbedSettings
    from histoembed.stages.embed import run_embed

    shutil.rmtree(run / store.FEATURES_DIR, ignore_errors=True)   # a fresh store, and a fresh target
    settings = EmbedSettings(encoder=str(model), repeats=args.repeats, batch_size=args.batch_size,
                             workers=args.workers, device=args.device, stain_norm=method)
    start = time.perf_counter()
    result = run_embed(run, settings, AugmentSettings())
    return time.perf_counter() - start, result.stain


def alone(run: Path, model: Path, args) -> dict:
    """One batch: Macenko normalisation alone against the bare forward of its views, on the stage's device,
    and against torchstain's ``normalize`` called crop by crop (on the CPU)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch
    from torchstain.torch.normalizers import TorchMacenkoNormalizer

    from histoembed.inputs.pixels import decode_png
    from histoembed.maths import stain
    from histoembed.models.encoders import load_encoder

    encoder = load_encoder(str(model), device=args.device)
    pngs = pq.read_table(run / "crops.parquet", columns=["png"])["png"].to_pylist()[:args.batch_size]
    x = torch.from_numpy(np.stack([decode_png(p) for p in pngs])).to(encoder.device)
    x = x.permute(0, 3, 1, 2).float().div_(255)
    target = stain.median_target("macenko", [x], None, 0.1)
    normaliser = stain.StainNormaliser(target, None)
    sync = torch.cuda.synchronize if encoder.device.type == "cuda" else (lambda: None)
    normaliser(x), encoder(x)   # warm-up
    times = {"normalise": [], "forward": [], "torchstain": []}
    reference = TorchMacenkoNormalizer()
    reference.HERef, reference.maxCRef = (torch.tensor(v) for v in (target.values["he"], target.values["max_c"]))
    as_uint8 = (x * 255).round().byte().cpu()
    for _ in range(3):
        sync()
        start = time.perf_counter()
        normaliser(x)
        sync()
        times["normalise"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(args.repeats):
            encoder(x)
        sync()
        times["forward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        for crop in as_uint8:
            reference.normalize(crop, stains=False)
        times["torchstain"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["vit-tiny", "vit-s", "vit-l"], default="vit-s")
    ap.add_argument("--crops", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=4, help="Views per crop.")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="Decoding processes.")
    ap.add_argument("--rounds", type=int, default=2, help="Runs of each setting (alternating).")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_model(tmp / "model", args.model)
        run = tmp / "run"
        write_crops(run, args.crops)
        stage_seconds(run, model, "none", args)   # warm-up: first loads, page cache
        seconds: dict[str, list[float]] = {"none": [], "macenko": []}
        summary = None
        for r in range(args.rounds):
            for method in (("none", "macenko") if r % 2 == 0 else ("macenko", "none")):
                s, note = stage_seconds(run, model, method, args)
                seconds[method].append(s)
                summary = note or summary
        batch = alone(run, model, args)
    none, macenko = statistics.median(seconds["none"]), statistics.median(seconds["macenko"])
    views = args.crops * args.repeats
    print(f"embed stage, {args.model}, {args.crops} crops x {args.repeats} views, batch {args.batch_size}, "
          f"device {args.device}, {torch.get_num_threads()} threads, {args.rounds} round(s) each:")
    print(f"  none     {none:7.1f} s  ({views / none:.1f} views/s)   runs: "
          + ", ".join(f"{s:.1f}" for s in seconds["none"]))
    print(f"  macenko  {macenko:7.1f} s  ({views / macenko:.1f} views/s)   runs: "
          + ", ".join(f"{s:.1f}" for s in seconds["macenko"]))
    print(f"  macenko / none = {macenko / none:.3f}  ({100 * (macenko / none - 1):+.1f} %)")
    if summary:
        print(f"  crops normalised {summary['normalised']}, passed through {summary['unchanged']}")
    print(f"one batch of {args.batch_size}: normalisation {batch['normalise'] * 1000:.0f} ms, bare forward of "
          f"{args.repeats} views {batch['forward'] * 1000:.0f} ms (ratio {batch['normalise'] / batch['forward']:.3f}); "
          f"torchstain's normalize crop by crop {batch['torchstain'] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
