"""The Ray engine against the local engine: crop-views/s on the same crops and model, in one run, as a ratio.

Issue 14's CPU target: the Ray engine reaches at least 85% of the local engine's rate. Both embed
the same crops.parquet (synthetic H&E crops, 224 px) with the same ViT (random weights, saved and
loaded through the package) in 4 views, each into its own run folder; the stores must agree
(features within 1e-5). Ray's own start-up (the local instance) is measured apart and left out of
the rate; the actors' start and model loading are in it, as the local engine's model loading is
in its rate. ``--rounds 2`` (the default) runs local, Ray, Ray, local and sums each engine's rows
and seconds, so a drift in the machine's load cancels out; the local runs have no Ray instance up.

Ray binds to this machine's network address unless it runs in a network namespace with loopback
alone: the script re-runs itself in one (``unshare -n``) where it can (root), and otherwise refuses.

    python benchmarks/bench_ray.py                          # vit-s, 256 crops, 4 views (some minutes on 2 cores)
    python benchmarks/bench_ray.py --model vit-tiny --crops 64   # seconds: a check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embed import MODELS, save_model, write_crops  # noqa: E402

TARGET_RATIO = 0.85


def loopback_only() -> bool:
    """Whether this process sees no network interface but loopback (a private namespace)."""
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def in_loopback_namespace(argv: list[str]) -> None:
    """Re-run this script in a loopback-only network namespace (root), or stop: Ray must not use the network."""
    if loopback_only():
        return
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        sys.exit("bench_ray: Ray would bind to this machine's network address; run it as root (it re-runs itself "
                 "in a loopback-only namespace with unshare -n) or inside such a namespace")
    cmd = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable, *argv]
    sys.exit(subprocess.run(cmd).returncode)


def compare(make_run: Callable[[str], Path], settings, augment, rounds: int = 1) -> dict:
    """Local, then Ray, then (``rounds`` 2) Ray and local again (ABBA, so a drift in the machine's load
    cancels out): each embeds a fresh run folder from ``make_run(tag)``; rates, ratio and agreement.

    The local engine runs with no Ray instance up; Ray's start-up is timed apart, not in its rate.
    """
    import numpy as np

    from histoembed.stages.embed import read_store, run_embed
    from histoembed.engines import ray as ray_engine

    done = {"local": [], "ray": []}  # (rows, seconds, run folder) of each embed

    def embed(engine: str) -> None:
        run = make_run(f"{engine}-{len(done[engine])}")
        res = run_embed(run, settings.model_copy(update={"engine": engine}), augment)
        done[engine].append((res.new_rows, res.seconds, run))

    embed("local")
    started = time.perf_counter()
    with ray_engine.session(None):
        ray_start_s = time.perf_counter() - started
        for _ in range(rounds):
            embed("ray")
    if rounds > 1:
        embed("local")
    a, b = read_store(done["local"][0][2]), read_store(done["ray"][0][2])
    order_a = np.lexsort((a.view, a.crop_index, a.image_id.astype(str), a.split))
    order_b = np.lexsort((b.view, b.crop_index, b.image_id.astype(str), b.split))
    same_rows = len(a) == len(b) and all((getattr(a, c)[order_a] == getattr(b, c)[order_b]).all()
                                         for c in ("split", "image_id", "crop_index", "view"))
    rate = {e: sum(r for r, _, _ in runs) / sum(t for _, t, _ in runs) for e, runs in done.items()}
    out = {"rows": done["local"][0][0], "rounds": rounds, "local_crop_views_per_s": rate["local"],
           "ray_crop_views_per_s": rate["ray"], "local_seconds": [t for _, t, _ in done["local"]],
           "ray_seconds": [t for _, t, _ in done["ray"]], "ray_start_s": ray_start_s, "same_rows": bool(same_rows),
           "max_abs_diff": float(np.abs(a.embedding[order_a] - b.embedding[order_b]).max()) if same_rows else None}
    out["ratio"] = out["ray_crop_views_per_s"] / out["local_crop_views_per_s"]
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="vit-s")
    p.add_argument("--crops", type=int, default=256)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decode processes of the local engine")
    p.add_argument("--rows-per-part", type=int, default=256)
    p.add_argument("--rounds", type=int, choices=(1, 2), default=2, help="2: local, ray, ray, local (ABBA)")
    args = p.parse_args(argv)
    in_loopback_namespace([str(Path(__file__).resolve()), *(sys.argv[1:] if argv is None else argv)])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from histoembed.core import store
    from histoembed.core.config import AugmentSettings, EmbedSettings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = save_model(tmp / "model", args.model)
        write_crops(tmp / "crops", args.crops)

        def make_run(tag: str) -> Path:
            (tmp / tag).mkdir()
            os.link(tmp / "crops" / store.CROPS_FILE, tmp / tag / store.CROPS_FILE)
            return tmp / tag

        settings = EmbedSettings(encoder=str(model), repeats=args.repeats, batch_size=args.batch_size,
                                 workers=args.workers, rows_per_part=args.rows_per_part, device="cpu")
        out = {"model": args.model, "crops": args.crops, "repeats": args.repeats, "batch_size": args.batch_size,
               "cpus": os.cpu_count(), **compare(make_run, settings, AugmentSettings(), args.rounds)}
    out["meets_target"] = out["ratio"] >= TARGET_RATIO
    print(json.dumps(out, indent=2))
    print(f"local {out['local_crop_views_per_s']:.1f} crop-views/s, ray {out['ray_crop_views_per_s']:.1f} "
          f"(Ray start-up {out['ray_start_s']:.1f} s apart): ray / local {out['ratio']:.1%} "
          f"(target {TARGET_RATIO:.0%}: {'met' if out['meets_target'] else 'NOT met'}); stores agree within "
          f"{out['max_abs_diff']:.2g}")
    return out


if __name__ == "__main__":
    main()
