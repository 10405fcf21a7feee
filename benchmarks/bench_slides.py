"""Whole slides: peak memory of `crops` and `embed` as the slide grows, and the patch read rate of embed's reader
against bare OpenSlide ``read_region`` calls on the same boxes (issue 20).

    python benchmarks/bench_slides.py --sizes 10000,20000 --out /tmp/bench-slides

For each size it writes one synthetic Aperio-like slide (and a second, for a two-slide manifest), runs
`histoembed crops --max-patches N` and `histoembed embed` (tiny random Dinov2, CPU) in child processes and
reads their peak RSS (``ru_maxrss`` of the child), then times, in this process, (a) bare
``read_region`` + composite + resize of every patch box, (b) the same boxes through
``histoembed.engines.batches.CropBatches`` (what embed's workers run), one process, no encoder, and (c) the
artifact scores ``crops`` computes on the same pixels (``scoring_over_embed_reading``: the time to score a patch
over the time embed's reader takes to read it; issue 31 asks for under 0.25).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from histoembed.core import store  # noqa: E402
from histoembed.engines.batches import CropBatches  # noqa: E402
from histoembed.inputs import artifacts, slides  # noqa: E402
from histoembed.tools.synthetic import SlideSpec, write_slide  # noqa: E402


def child_peak_mb(args: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of ``python -m histoembed ARGS`` in a fresh process.

    The peak is the child's own ``VmHWM`` (``ru_maxrss`` would keep the forking parent's peak across exec).
    """
    code = ("import resource, runpy, sys; sys.argv = ['histoembed'] + sys.argv[1:]\n"
            "try:\n    runpy.run_module('histoembed', run_name='__main__')\n"
            "finally:\n    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]\n"
            "    print('PEAK_KB', hwm, file=sys.stderr)")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    secs = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{args} failed:\n{p.stdout}\n{p.stderr}")
    kb = int(next(line.split()[1] for line in p.stderr.splitlines() if line.startswith("PEAK_KB")))
    return kb / 1024, secs


def tiny_encoder(path: Path) -> Path:
    import torch
    from transformers import Dinov2Config, Dinov2Model

    if not (path / "config.json").exists():
        torch.manual_seed(0)
        Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                 image_size=32, patch_size=16)).eval().save_pretrained(path)
    return path


def read_rates(crops: Path, n: int) -> dict:
    t = pq.read_table(crops, columns=["source", "level", "x0", "y0", "x1"]).slice(0, n).to_pylist()
    size = int(store.read_meta(crops)["settings"]["size"])
    handle = slides.open_slide(t[0]["source"])
    start = time.perf_counter()
    pixels = []
    for r in t:  # openslide-python's public read_region (histoembed's read_patch reads faster since issue 32)
        side = slides.read_side(r["x1"] - r["x0"], handle.level_downsamples[r["level"]])
        pixels.append(slides.resize_square(slides.rgba_to_rgb(handle.read_region((r["x0"], r["y0"]), r["level"],
                                                                                 (side, side))), size))
    bare = len(t) / (time.perf_counter() - start)
    mpp = float(store.read_meta(crops)["settings"]["mpp"])
    start = time.perf_counter()
    for p in pixels:                      # crops' artifact scores of the same pixels (issue 31)
        artifacts.score_patch(p, mpp)
    scored = len(t) / (time.perf_counter() - start)
    batches = [np.arange(i, min(i + 64, len(t))) for i in range(0, len(t), 64)]
    start = time.perf_counter()
    got = sum(len(b) for _, b in CropBatches(crops, batches))
    ours = got / (time.perf_counter() - start)
    return {"patches": len(t), "bare_read_region_per_s": round(bare, 1), "crop_batches_per_s": round(ours, 1),
            "ratio": round(ours / bare, 3), "artifact_scores_per_s": round(scored, 1),
            "scoring_over_embed_reading": round(ours / scored, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10000,20000", help="level-0 sides of the slides, comma-separated")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-slides"))
    ap.add_argument("--max-patches", type=int, default=300, help="patches per slide embedded (memory: same work)")
    ap.add_argument("--read-patches", type=int, default=600, help="patches timed for the read rate")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    enc = tiny_encoder(a.out / "tiny-dinov2")
    base_mb, _ = child_peak_mb(["encoders"], a.out)  # the interpreter and histoembed's imports, no slide
    print(json.dumps({"baseline_peak_mb (histoembed encoders)": round(base_mb)}), flush=True)
    results = []
    for size in (int(s) for s in a.sizes.split(",")):
        folder = a.out / f"slide-{size}"
        folder.mkdir(exist_ok=True)
        t = time.perf_counter()
        for i, label in enumerate(["benign", "malignant"]):
            if not (folder / f"s{i}.svs").exists():
                write_slide(folder / f"s{i}.tmp.svs", SlideSpec(i, size, size, label))
                os.replace(folder / f"s{i}.tmp.svs", folder / f"s{i}.svs")
        written = time.perf_counter() - t
        (folder / "manifest.csv").write_text("image,mask,label,split\ns0.svs,,benign,train\ns1.svs,,malignant,train\n")
        crops_all = child_peak_mb(["crops", "--data", "manifest.csv", "--run", "run-all", "--workers", "1"], folder)
        crops_mb = child_peak_mb(["crops", "--data", "manifest.csv", "--run", "run", "--workers", "1",
                                  "--max-patches", str(a.max_patches)], folder)
        embed_mb = child_peak_mb(["embed", "--run", "run", "--encoder", str(enc), "--workers", "0", "--repeats", "1"],
                                 folder)
        n_all = pq.read_metadata(folder / "run-all" / store.CROPS_FILE).num_rows
        row = {"side_px": size, "slide_mb": round((folder / "s0.svs").stat().st_size / 2**20, 1),
               "write_s": round(written, 1), "tissue_patches": n_all,
               "crops_all_peak_mb": round(crops_all[0]), "crops_all_s": round(crops_all[1], 1),
               "crops_peak_mb": round(crops_mb[0]), "embed_peak_mb": round(embed_mb[0]),
               "embed_s": round(embed_mb[1], 1),
               **read_rates(folder / "run-all" / store.CROPS_FILE, a.read_patches)}
        print(json.dumps(row), flush=True)
        results.append(row)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"self peak {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
