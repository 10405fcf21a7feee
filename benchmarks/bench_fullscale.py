"""Every stage at the reference challenge's full size on this CPU: time and peak memory per stage.

Generates (once, cached in --out) 691 training and 477 test images in the real layout, both
splits named from img_0000.png, image sizes spread like the real PNGs (0.2-3.6 MB at
--size-scale 1), 60 mask twins and 10 test copies of training images
(``synthetic.reference_scale``). Then runs the README's commands exactly as written, each as
its own process in a folder that holds ``data/``, with ``efficientnet-lite0`` as the encoder
of both QC and embed, and reports each stage's wall time, CPU time and peak resident memory
(``wait4`` of that process), plus whether QC found the planted mask twins and test copies
(missed / false pairs). ``--encoder vit-s`` or ``vit-l`` embeds with a ViT/16 of random weights
instead (``bench_embed.MODELS``, saved under --out; ViT-L costs what Phikon-v2 costs; QC keeps
efficientnet-lite0); the stages run on the GPU when there is one (``benchmarks/gpu.sh`` runs
this with ViT-L). ``--json`` writes the figures after every stage, so a run cut short keeps them.

    python benchmarks/bench_fullscale.py                 # realistic sizes (long: see RESULTS.md)
    python benchmarks/bench_fullscale.py --encoder vit-s
    python benchmarks/bench_fullscale.py --size-scale 0.1 --repeats 2
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def make_data(root: Path, size_scale: float, seed: int) -> tuple[Path, float]:
    """The full-scale dataset under root/data, made once per (size_scale, seed); seconds spent making it."""
    from histoembed.tools.synthetic import reference_scale

    data = root / "data"
    marker = root / f".made-{size_scale}-{seed}"
    if marker.exists():
        return data, 0.0
    shutil.rmtree(data, ignore_errors=True)
    start = time.perf_counter()
    reference_scale(data, seed=seed, size_scale=size_scale)
    marker.touch()
    return data, time.perf_counter() - start


def run_stage(args: list[str], cwd: Path) -> dict:
    """One ``histoembed`` command as its own process: wall s, CPU s (user + system) and peak RSS MiB."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "200"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "histoembed", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"histoembed {' '.join(args)} failed ({proc.returncode}):\n{out}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024,
            "output": out}


def qc_against_planted(data: Path, run: Path) -> dict:
    """Planted mask twins and test copies against what qc.parquet lists: found, missed, false."""
    import pyarrow.parquet as pq

    planted = json.loads((data / "planted.json").read_text())
    rows = pq.read_table(run / "qc.parquet").to_pylist()
    twins = {tuple(sorted((r["image_id"], j))) for r in rows for j in r["mask_twin"] or []}
    want_twins = {tuple(sorted(p)) for p in planted["mask_twins"]}
    leaks = {(r["image_id"], r["near_train"]) for r in rows if r["near_train"]}
    want_leaks = {tuple(p) for p in planted["near_duplicates"]}
    return {"mask_twins": [len(twins & want_twins), len(want_twins - twins), len(twins - want_twins)],
            "test_copies": [len(leaks & want_leaks), len(want_leaks - leaks), len(leaks - want_leaks)],
            "false_test_copies": sorted(leaks - want_leaks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/histoembed-bench-fullscale"),
                    help="Folder for the generated data (reused when it matches) and the run.")
    ap.add_argument("--size-scale", type=float, default=1.0, help="Image sides times this (1: realistic).")
    ap.add_argument("--repeats", type=int, default=4, help="Views per crop (`embed --repeats`).")
    ap.add_argument("--folds", type=int, default=10, help="`fit --folds`.")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the generated data.")
    ap.add_argument("--encoder", choices=["efficientnet-lite0", "vit-s", "vit-l"], default="efficientnet-lite0",
                    help="Encoder of the embed stage: the packaged EfficientNet-Lite0 or a ViT/16 of random weights.")
    ap.add_argument("--json", type=Path, help="Write the figures here (after every stage).")
    args = ap.parse_args()

    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    data, made = make_data(root, args.size_scale, args.seed)
    shutil.rmtree(root / "run", ignore_errors=True)
    encoder = args.encoder
    if encoder.startswith("vit-"):
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_embed import save_model

        encoder = str(save_model(root / encoder, encoder).resolve())
    (root / "histoembed.toml").write_text(f'[qc]\nencoder = "efficientnet-lite0"\n\n[embed]\nencoder = "{encoder}"\n')
    sizes = sorted(p.stat().st_size for p in data.glob("*_data/img_*.png"))
    print(f"data: {len(sizes)} images, PNG {sizes[0] / 1e6:.2f}-{sizes[-1] / 1e6:.2f} MB "
          f"(median {sizes[len(sizes) // 2] / 1e6:.2f}); made in {made:.0f} s" + (" (cached)" if not made else ""))
    print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")

    commands = [["qc"], ["crops"], ["embed", "--repeats", str(args.repeats)], ["fit", "--folds", str(args.folds)],
                ["submit"]]
    results = {}
    record = {"encoder": args.encoder, "size_scale": args.size_scale, "images": len(sizes), "synth_s": made or None,
              "cpus": os.cpu_count(), "stages": results}
    for cmd in commands:
        r = run_stage(cmd, root)
        results[" ".join(cmd)] = {k: round(v, 1) for k, v in r.items() if k != "output"}
        print(f"histoembed {' '.join(cmd):<18} wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
              f"peak {r['peak_mib']:6.0f} MiB  (load {os.getloadavg()[0]:.1f})", flush=True)
        write_json(args.json, record)
    total = sum(r["wall_s"] for r in results.values())
    record["qc_to_submission_s"] = round(total, 1)
    print(f"all stages: wall {total:.1f} s")

    with (root / "run" / "submission.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    expected = sorted(p.name for p in (data / "test_data").glob("img_*.png"))
    print(f"submission: {len(rows) - 1} rows, in test_data/ order: {[r[0] for r in rows[1:]] == expected}")
    metrics = json.loads((root / "run" / "metrics.json").read_text())
    f1 = {h: round(v["macro_f1"], 3) for h, v in metrics.get("heads", {}).items() if "macro_f1" in v}
    print(f"out-of-fold macro-F1: {f1}")
    found = qc_against_planted(data, root / "run")
    print(f"QC mask twins found/missed/false: {found['mask_twins']}; "
          f"test copies found/missed/false: {found['test_copies']}")
    for test_id, train_id in found["false_test_copies"]:
        print(f"  listed but not planted: test {test_id} ~ train {train_id}")
    record.update(macro_f1=f1, qc_found_missed_false=found)
    write_json(args.json, record)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


def write_json(path: Path | None, record: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
