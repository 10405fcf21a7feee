"""One GPU run of the embed stage at Phikon-v2's cost, sized to finish within 5 minutes (budget 270 s).

``benchmarks/gpu.sh`` runs this on a (possibly air-gapped) GPU server; every figure is
measured in this one process, so ratios compare like with like. Sections, each on its own
(an error in one is printed and recorded, the others still run):

- env:      device, driver-side versions, CPU count.
- bare:     ViT-L/16 at 224 px (Phikon-v2's shape: Dinov2, hidden 1024, 24 layers, 16 heads,
            patch 16, MLP ratio 4, no registers; random weights built from the config, saved
            with ``save_pretrained`` and loaded by ``histoembed.models.encoders``) on ready float
            tensors, the package's bf16 (on CUDA a bf16 copy of the weights) and fp32, crops/s
            at several batch sizes.
- stage:    ``histoembed.stages.embed.run_embed`` (what ``histoembed embed`` calls) from a
            crops.parquet of synthetic H&E crops: read, decode PNG in workers, augment on the
            device, forward, write the Parquet store; 4 views in bf16, crop-views/s and its
            ratio to the bare bf16 forward at the same batch size. The store of a 2-batch
            warm-up run is compared with ``embed_crops`` of the same crops (a race would show).
- pipeline: the same stage with a 1-block ViT of the same width (same 1024-d store rows),
            so the model costs little and the pipeline's own ceiling shows.
- parts:    the stage's pieces alone (decode loader, augmentation, store writing), per second;
            augmentation on the device against the CPU; how often queueing a batch makes the
            host wait for the GPU (torch's sync debug mode).
- cosine:   bf16 (the package's, and autocast) against fp32 features of the same crops and views.
- autocast: the stage and its bare forward in bf16 autocast over fp32 weights, against the
            package's bf16 (on CUDA a bf16 copy of the weights, every operation in bf16).
- defaults: the stage as ``histoembed embed`` runs without options (on CUDA the batch size and decode
            workers ``histoembed.models.gpu_sizing`` chooses; on the CPU batch 64, 2 decode workers) on as many
            crops as the stage section's measured run, and its rate over that hand-tuned run's (batch 256,
            6 workers: the best measured on an H100); issue 22's target is 90 %.
- fast:     issue 22's faster forwards, each at the stage section's batch size: compiled for one batch shape
            (``--compile``, the last batch padded) and in fp8 (``--precision fp8``, H100/H200), against the
            package's eager bf16 (eager fp32 on a CPU): bare crops/s, seconds of the first (compiling) call,
            and the stage's own check against eager fp32 on real crops; then the whole stage with the
            fastest variant that passes, on the stage section's crops, and its rate over that section's.
- ray:      the stage with ``--engine ray`` (a local Ray instance, one actor per GPU) against the local
            engine on the same crops, as a ratio; skipped without Ray, or outside a network namespace
            with loopback alone (gpu.sh makes one as root: Ray must not bind to the network).

Each section records its peak GPU memory (``torch.cuda.max_memory_allocated``). Results go
to ``--out`` as gpu_bench.json and gpu_bench.md after every section, so a run cut short
keeps what it measured. ``--smoke`` runs every section on the CPU with a tiny model.

    python benchmarks/bench_gpu.py --out results/            # the GPU run (at most 5 minutes)
    python benchmarks/bench_gpu.py --smoke --device cpu      # seconds; what the test runs
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_embed, when imported from tests

from bench_embed import MODELS, write_crops  # noqa: E402

# In order of what a run must not miss when its budget runs out: issue 22's figures first, then those
# measured on an H100 before (benchmarks/RESULTS.md).
SECTIONS = ("env", "bare", "stage", "defaults", "fast", "ray", "cosine", "autocast", "pipeline", "parts")
TARGET_DEFAULTS_SHARE = 0.9  # issue 22: at the CLI's defaults, at least 90 % of the hand-tuned stage's rate
TARGET_VIEWS_PER_S = 3000  # issue 14: ViT-L/16, bf16, 4 views, one H100, end to end

# A ViT as wide as ViT-L (same 1024-d rows to write) with one block: nearly free to run.
MODELS = {**MODELS, "cheap": dict(hidden_size=1024, num_hidden_layers=1, num_attention_heads=16, mlp_ratio=4),
          "cheap-tiny": dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2)}


@dataclasses.dataclass
class Plan:
    """Sizes of one run; ``full`` for the GPU, ``smoke`` for a CPU check in seconds."""

    model: str                     # a bench_embed.MODELS name
    cheap_model: str               # the nearly free model of the pipeline section
    image_size: int                # crops and model input, pixels
    bare_batches: list[int]        # batch sizes of the bare forward
    bare_views: int                # crops timed per (precision, batch size), at least 2 batches
    bare_cap_s: float              # ... or fewer when this many seconds have passed
    batch_size: int                # crops per batch in the stage
    views: int
    stage_batches: int             # batches in the measured stage run (fewer if the budget needs)
    stage_cap_s: float             # the measured stage run aims to take at most this long
    workers: int                   # PNG decoding processes
    cosine_crops: int
    budget_s: float                # the whole run; sections that would overrun are skipped


FULL = Plan(model="vit-l", cheap_model="cheap", image_size=224, bare_batches=[128, 256, 512], bare_views=3072,
            bare_cap_s=8, batch_size=256, views=4, stage_batches=40, stage_cap_s=35, workers=6, cosine_crops=256,
            budget_s=270)
SMOKE = Plan(model="vit-tiny", cheap_model="cheap-tiny", image_size=32, bare_batches=[4, 8], bare_views=16,
             bare_cap_s=5, batch_size=8, views=4, stage_batches=3, stage_cap_s=10, workers=1, cosine_crops=8,
             budget_s=120)


AUTOCAST = "bf16-autocast"


def autocast_encoder(enc):
    """``enc`` in bf16 autocast over its fp32 weights, the package's bf16 before it ran a bf16 copy of
    the weights on CUDA (autocast keeps layer norms, layer scales and residual adds in fp32)."""
    fields = {"cast_weights": False} if "cast_weights" in {f.name for f in dataclasses.fields(enc)} else {}
    return dataclasses.replace(enc, precision="bf16", **fields)


class Run:
    """Shared state of one run: the plan, the device, the models and crops made once."""

    def __init__(self, plan: Plan, device: str, tmp: Path):
        import torch

        self.plan, self.tmp, self.started = plan, tmp, time.perf_counter()
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                                   else ("cpu" if device == "auto" else device))
        self.cuda = self.device.type == "cuda"
        self._cache: dict[str, object] = {}
        self.done: dict[str, dict] = {}  # the sections run so far, by name

    def left_s(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.started)

    def sync(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize(self.device)

    def cached(self, name: str, make: Callable[[], object]):
        if name not in self._cache:
            self._cache[name] = make()
        return self._cache[name]

    def model_dir(self, name: str) -> Path:
        """A random-weight Dinov2 saved like a checkpoint (``save_pretrained``, safetensors)."""
        def make() -> Path:
            import torch
            from transformers import Dinov2Config, Dinov2Model
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # "Writing model shards" would clutter the log
            config = MODELS[name]
            torch.manual_seed(0)
            cfg = Dinov2Config(image_size=self.plan.image_size, patch_size=16, **config)
            with torch.device(self.device):  # initialising 300M weights on the GPU takes a fraction of the CPU's time
                model = Dinov2Model(cfg)
            folder = self.tmp / f"model-{name}"
            model.to("cpu").eval().save_pretrained(folder, safe_serialization=True)
            return folder
        return self.cached(f"dir:{name}", make)

    def encoder(self, name: str, precision: str = "bf16"):
        """The model loaded through the package (``load_encoder``), once; other precisions share it."""
        from histoembed.models.encoders import load_encoder

        enc = self.cached(f"enc:{name}", lambda: load_encoder(str(self.model_dir(name)), device=self.device.type,
                                                              precision="fp32"))
        if precision == AUTOCAST:
            return autocast_encoder(enc)
        return dataclasses.replace(enc, precision=precision)

    def crops_run(self, n_crops: int, tag: str) -> Path:
        """A run folder of its own with crops.parquet of ``n_crops`` synthetic H&E crops (made once per count)."""
        from histoembed.core import store

        made = self.tmp / f"crops-{n_crops}"
        if not made.exists():
            write_crops(made, n_crops, size=self.plan.image_size)
        run = self.tmp / f"run-{tag}-{n_crops}"
        if not run.exists():
            run.mkdir()
            os.link(made / store.CROPS_FILE, run / store.CROPS_FILE)
        return run

    def settings(self, model_dir: Path, **kw):
        from histoembed.core.config import EmbedSettings

        p = self.plan
        kw = {"batch_size": p.batch_size, "workers": p.workers, **kw}
        return EmbedSettings(encoder=str(model_dir), repeats=p.views, device=self.device.type,
                             precision="bf16" if self.cuda else "fp32", **kw)


# ---------------------------------------------------------------- sections

def section_env(r: Run) -> dict:
    import torch
    import transformers

    out = {"device": str(r.device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "plan": dataclasses.asdict(r.plan)}
    with contextlib.suppress(Exception):  # fp32 matmuls stay fp32 unless TF32 is on (it is off by default)
        out["tf32_matmul"] = bool(torch.backends.cuda.matmul.allow_tf32)
    with contextlib.suppress(Exception):
        import histoembed
        out["histoembed"] = histoembed.__version__
    with contextlib.suppress(Exception):
        import pydantic
        out["pydantic_from"] = str(Path(pydantic.__file__).parent.parent)
    if r.cuda:
        props = torch.cuda.get_device_properties(r.device)
        out.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported())
    else:
        out["device_name"] = platform.processor() or platform.machine()
    print(f"  {out['device_name']} | torch {out['torch']} | transformers {out['transformers']} | "
          f"python {out['python']} | {out['cpu_count']} CPUs")
    return out


def time_forward(r: Run, enc, batch: int, views: int, cap_s: float) -> dict:
    """crops/s of ``enc`` on one ready float batch, after two warm-up calls."""
    import torch

    x = torch.rand(batch, 3, r.plan.image_size, r.plan.image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(r.device)
    for _ in range(2):
        enc(x)
    r.sync()
    n, start = 0, time.perf_counter()
    while n < max(views, 2 * batch):
        enc(x)
        n += batch
        if n >= 2 * batch and time.perf_counter() - start > cap_s:
            break
    r.sync()
    seconds = time.perf_counter() - start
    return {"batch": batch, "crops": n, "seconds": seconds, "crops_per_s": n / seconds}


def section_bare(r: Run) -> dict:
    out: dict = {"model": r.plan.model, "bf16": {}, "fp32": {}}
    for precision in ("bf16", "fp32") if r.cuda else ("fp32", "bf16"):
        enc = r.encoder(r.plan.model, precision)
        for bs in r.plan.bare_batches:
            if r.left_s() < 60:
                out[precision][str(bs)] = {"skipped": "time budget"}
                continue
            m = time_forward(r, enc, bs, r.plan.bare_views, r.plan.bare_cap_s)
            out[precision][str(bs)] = m
            print(f"  {r.plan.model} {precision} batch {bs:4d}: {m['crops_per_s']:9.1f} crops/s "
                  f"({m['crops']} crops, {m['seconds']:.2f} s)")
    return out


def timed_stage(r: Run, model: str, tag: str, precision: str | None = None, n_crops: int | None = None,
                **settings_kw) -> dict:
    """Warm-up run (2 batches, checked against in-memory features), then the measured run, sized to the
    time left (or ``n_crops``, rounded up to whole batches); each in a run folder of its own (``tag``).
    Settings left None are chosen as ``histoembed embed`` chooses them (``forward.sized``)."""
    from histoembed.core.config import AugmentSettings
    from histoembed.stages.embed import run_embed
    from histoembed.engines.forward import sized

    p = r.plan
    enc = r.encoder(model, precision or ("bf16" if r.cuda else "fp32"))
    settings = sized(r.settings(r.model_dir(model), **settings_kw), enc)
    bs = settings.batch_size
    warm = r.crops_run(2 * bs, f"{tag}-warm")
    start = time.perf_counter()
    w = run_embed(warm, settings, AugmentSettings(), encoder=enc)
    warm_rate = w.new_rows / (time.perf_counter() - start)
    check = store_against_memory(r, warm, w.store_dir, enc, settings.seed, bs)
    # Size the measured run: the plan's batches, fewer if the warm-up's rate says they would overrun.
    room_s = min(p.stage_cap_s, max(5.0, r.left_s() - 90))
    batches = max(2, min(p.stage_batches, int(room_s * warm_rate / (p.views * bs))))
    if n_crops:
        batches = max(2, -(-n_crops // bs))
    run = r.crops_run(batches * bs, tag)
    start = time.perf_counter()
    res = run_embed(run, settings, AugmentSettings(), encoder=enc)
    seconds = time.perf_counter() - start
    store_rows = sum(_parquet_rows(f) for f in res.store_dir.glob("part-*.parquet"))
    if res.new_rows != store_rows or store_rows != batches * bs * p.views:
        raise RuntimeError(f"the store holds {store_rows} rows ({res.new_rows} new), expected {batches * bs * p.views}")
    return {"model": model, "precision": precision or enc.precision, "views": p.views, "batch_size": bs,
            "workers": settings.workers, "crops": batches * bs, "rows": res.new_rows, "seconds": seconds,
            "crop_views_per_s": res.new_rows / seconds, "crops_per_s": res.new_rows / p.views / seconds,
            "warmup_crop_views_per_s": warm_rate, "store_parts": len(list(res.store_dir.glob("part-*.parquet"))),
            "cast_weights": getattr(enc, "cast_weights", None), "precision_check": _check_meta(res), **check}


def _check_meta(result) -> dict | None:
    """The stage's own bf16-against-fp32 check of its first batch (run inside the timed stage), if it ran one."""
    check = getattr(result, "precision_check", None)
    return check.as_meta() if check is not None else None


def store_against_memory(r: Run, run: Path, store_dir: Path, enc, seed: int, batch_size: int) -> dict:
    """The rows the stage wrote (batches queued on the device, copied back asynchronously) against
    ``embed_crops`` (plain copies) of the same crops, views and batches: a race would show here."""
    import numpy as np
    import pyarrow.parquet as pq

    from histoembed.core import feature_store, store
    from histoembed.core.config import AugmentSettings
    from histoembed.engines.forward import embed_crops
    from histoembed.inputs.pixels import decode_png

    t = pq.read_table(run / store.CROPS_FILE, columns=["image_id", "crop_index", "png"])
    crops = np.stack([decode_png(b) for b in t["png"].to_pylist()])
    mem = embed_crops(enc, crops, views=r.plan.views, augment=AugmentSettings(), seed=seed,
                      image_ids=t["image_id"].to_pylist(), crop_index=t["crop_index"].to_pylist(),
                      batch_size=batch_size)
    f = feature_store.read_features(store_dir)
    order = np.lexsort((f.view, f.crop_index, f.image_id.astype(str)))  # crop-major, as embed_crops
    diff = float(np.abs(f.embedding[order] - mem).max())
    scale = float(np.abs(mem).max())
    if not diff <= 1e-2 * scale:
        raise RuntimeError(f"the store differs from the in-memory features of the same crops: max |diff| {diff:.3g} "
                           f"(features up to {scale:.3g})")
    spread = float(np.abs(mem - mem.mean(axis=0)).max())  # how far rows of different crops and views lie apart
    return {"store_vs_memory_max_abs_diff": diff, "feature_max_abs": scale, "feature_spread": spread}


def _parquet_rows(path: Path) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows


def section_stage(r: Run, tag: str = "stage", precision: str | None = None, **settings_kw) -> dict:
    out = timed_stage(r, r.plan.model, tag, precision, **settings_kw)
    bare = time_forward(r, r.encoder(r.plan.model, out["precision"]), out["batch_size"], r.plan.bare_views,
                        r.plan.bare_cap_s)
    out["bare_crops_per_s_same_batch"] = bare["crops_per_s"]
    out["ratio_to_bare"] = out["crop_views_per_s"] / bare["crops_per_s"]
    out["target_crop_views_per_s"] = TARGET_VIEWS_PER_S
    out["meets_target"] = bool(r.cuda and out["crop_views_per_s"] >= TARGET_VIEWS_PER_S)
    print(f"  whole stage {out['model']} {out['precision']} {out['views']} views, batch {out['batch_size']}, "
          f"{out['workers']} decode workers, {out['crops']} crops: "
          f"{out['crop_views_per_s']:9.1f} crop-views/s ({out['seconds']:.1f} s); bare forward, same batch: "
          f"{bare['crops_per_s']:9.1f}; stage / bare {out['ratio_to_bare']:.1%}; "
          f"target {TARGET_VIEWS_PER_S} {'met' if out['meets_target'] else 'NOT met'}")
    print(f"  store vs in-memory features of the warm-up crops: max |diff| {out['store_vs_memory_max_abs_diff']:.3g} "
          f"(rows spread up to {out['feature_spread']:.3g})")
    return out


def section_autocast(r: Run) -> dict:
    """The stage in bf16 autocast (see ``autocast_encoder``), against its own bare forward."""
    return section_stage(r, "autocast", AUTOCAST)


def section_defaults(r: Run) -> dict:
    """The stage as ``histoembed embed`` runs it without options (batch size and decode workers as the stage
    chooses them), on as many crops as the stage section's measured run, and its rate over that run's."""
    from histoembed.core.config import EmbedSettings

    defaults = EmbedSettings()
    tuned = r.done.get("stage", {})
    out = section_stage(r, "defaults", n_crops=tuned.get("crops"), batch_size=defaults.batch_size,
                        workers=defaults.workers)
    if tuned.get("crop_views_per_s"):
        out["tuned"] = {k: tuned[k] for k in ("batch_size", "workers", "crops", "crop_views_per_s")}
        out["ratio_to_tuned"] = out["crop_views_per_s"] / tuned["crop_views_per_s"]
        out["meets_defaults_target"] = out["ratio_to_tuned"] >= TARGET_DEFAULTS_SHARE
        print(f"  defaults (batch {out['batch_size']}, {out['workers']} workers) / hand-tuned (batch "
              f"{tuned['batch_size']}, {tuned['workers']} workers): {out['ratio_to_tuned']:.1%} "
              f"(target {TARGET_DEFAULTS_SHARE:.0%} {'met' if out['meets_defaults_target'] else 'NOT met'})")
    return out


def section_pipeline(r: Run) -> dict:
    out = timed_stage(r, r.plan.cheap_model, "pipeline")
    out["model"] = f"1-block ViT, {MODELS[r.plan.cheap_model]['hidden_size']}-d"
    print(f"  pipeline ceiling ({out['model']} rows) {out['views']} views: "
          f"{out['crop_views_per_s']:9.1f} crop-views/s ({out['seconds']:.1f} s)")
    return out


def count_host_syncs(r: Run, queue: Callable[[], object]) -> int | None:
    """How often ``queue()`` makes the host wait for the GPU (torch's sync debug mode); None on a CPU."""
    if not r.cuda:
        return None
    import warnings

    import torch

    r.sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            queue()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    r.sync()
    return sum("synchroniz" in str(w.message) for w in caught)


def section_parts(r: Run) -> dict:
    """Each piece of the stage alone, to name the bottleneck when the stage falls short."""
    import torch

    from histoembed.core import feature_store, store
    from histoembed.core.config import AugmentSettings
    from histoembed.core.feature_store import PartWriter, part_rows
    from histoembed.engines.batches import CropBatches, plan_batches
    from histoembed.engines.forward import copy_to_host, queue_views
    from histoembed.maths.augment import augment_batch

    p, out = r.plan, {}
    run = r.crops_run(max(4, min(p.stage_batches, 8)) * p.batch_size, "parts")
    n = p.batch_size * max(4, min(p.stage_batches, 8))
    # 1. reading and decoding PNGs in the stage's DataLoader, nothing else.
    batches = plan_batches(list(range(n)), ["train"] * n, p.batch_size)
    loader = torch.utils.data.DataLoader(CropBatches(run / store.CROPS_FILE, batches), batch_size=None,
                                         num_workers=p.workers, pin_memory=r.cuda)
    start, got = time.perf_counter(), 0
    first = None
    for _, crops in loader:
        got += len(crops)
        first = crops if first is None else first
    out["decode_crops_per_s"] = got / (time.perf_counter() - start)
    # 2. augmenting views 1..r-1 of one batch on the device (parameter draws on the CPU included).
    x = first.to(r.device).permute(0, 3, 1, 2).float().div_(255)
    ids, idx = ["img"] * len(x), list(range(len(x)))
    augment_batch(x, ids, idx, [1] * len(x), AugmentSettings(), 0)
    r.sync()
    start, views = time.perf_counter(), 0
    for rep in range(3):
        for v in range(1, p.views):
            augment_batch(x, ids, [i + rep * len(x) for i in idx], [v] * len(x), AugmentSettings(), 0)
            views += len(x)
    r.sync()
    out["augment_views_per_s"] = views / (time.perf_counter() - start)
    # ... and the same views on the CPU: the device's draws and copies must give the CPU's augmentation.
    k = min(32, len(x))
    on_device = augment_batch(x[:k], ids[:k], idx[:k], [1] * k, AugmentSettings(), 0).cpu()
    on_cpu = augment_batch(x[:k].cpu(), ids[:k], idx[:k], [1] * k, AugmentSettings(), 0)
    out["augment_device_vs_cpu_max_abs_diff"] = float((on_device - on_cpu).abs().max())
    # Host waits for the device while one batch's views are queued: each stalls the queue.
    enc = r.encoder(p.model, "bf16" if r.cuda else "fp32")
    out["augment_host_syncs"] = count_host_syncs(
        r, lambda: augment_batch(x, ids, idx, [1] * len(x), AugmentSettings(), 0))
    out["queue_views_host_syncs"] = count_host_syncs(
        r, lambda: queue_views(enc, first, ids, idx, list(range(p.views)), AugmentSettings(), 0))
    # 3. writing rows of the model's width to the store (Arrow table + zstd Parquet).
    dim, b = MODELS[p.model]["hidden_size"], p.batch_size
    schema = feature_store.feature_schema(dim, "float32")
    feats = torch.randn(b, p.views, dim).numpy()
    folder = r.tmp / "parts-store"
    folder.mkdir(exist_ok=True)
    writer = PartWriter(folder, (0, 1), schema, 1 << 30)
    start, rows = time.perf_counter(), 0
    for k in range(4):
        writer.write(part_rows([f"img{k}"] * b, ["train"] * b, list(range(b)), list(range(p.views)), feats, schema))
        rows += b * p.views
    writer.commit()
    out["write_rows_per_s"] = rows / (time.perf_counter() - start)
    # 4. copying a batch's features [B, V, D] back to pinned host memory, as run_embed does.
    y = torch.randn(b, p.views, dim, device=r.device)
    r.sync()
    start = time.perf_counter()
    for _ in range(8):
        host, copied = copy_to_host(y)
        if copied is not None:
            copied.synchronize()
    out["d2h_rows_per_s"] = 8 * b * p.views / (time.perf_counter() - start)
    print(f"  decode {out['decode_crops_per_s']:9.1f} crops/s ({p.workers} workers) | augment "
          f"{out['augment_views_per_s']:9.1f} views/s | write {out['write_rows_per_s']:9.1f} rows/s | "
          f"device->host {out['d2h_rows_per_s']:9.1f} rows/s | augmentation on the device vs the CPU: "
          f"max |diff| {out['augment_device_vs_cpu_max_abs_diff']:.2g} (pixels in [0, 1]) | host waits while "
          f"queueing: augmentation {out['augment_host_syncs']}, a batch's {p.views} views "
          f"{out['queue_views_host_syncs']}")
    return out


def section_cosine(r: Run) -> dict:
    """bf16 autocast against fp32 on the same crops and views, through ``embed_crops``."""
    import numpy as np
    import pyarrow.parquet as pq

    from histoembed.core import store
    from histoembed.engines.forward import embed_crops
    from histoembed.inputs.pixels import decode_png

    n = r.plan.cosine_crops
    run = r.crops_run(max(n, 2 * r.plan.batch_size), "warm")
    pngs = pq.read_table(run / store.CROPS_FILE, columns=["png"])["png"].to_pylist()[:n]
    crops = np.stack([decode_png(b) for b in pngs])
    feats = {}
    for precision in ("fp32", "bf16", AUTOCAST):
        feats[precision] = embed_crops(r.encoder(r.plan.model, precision), crops, views=r.plan.views,
                                       image_ids=[f"img{i}" for i in range(n)], batch_size=min(64, n))
    out = {"note": "random weights; bf16 as the package runs it (on CUDA a bf16 copy of the weights), and bf16 "
                   "autocast; features as float32"}
    for precision, prefix in (("bf16", ""), (AUTOCAST, "autocast_")):
        a, b = feats["fp32"], feats[precision]
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out.update({"rows": len(cos), f"{prefix}min_cosine": float(cos.min()),
                    f"{prefix}mean_cosine": float(cos.mean())})
        print(f"  {precision} vs fp32, {n} crops x {r.plan.views} views: min cosine {cos.min():.5f}, "
              f"mean {cos.mean():.5f}")
    return out


def section_ray(r: Run) -> dict:
    """The stage with ``--engine ray`` (a local Ray instance, one actor per GPU) against the local engine on the
    same crops, in this run (bench_ray.compare); skipped without Ray or outside a loopback-only namespace."""
    try:
        import ray  # noqa: F401
    except ImportError:
        print("  skipped: Ray is not installed")
        return {"skipped": "ray is not installed"}
    from bench_ray import compare, loopback_only

    if not loopback_only():
        print("  skipped: Ray would bind to this machine's network address (gpu.sh runs in a loopback-only "
              "namespace as root)")
        return {"skipped": "not in a loopback-only network namespace"}
    from histoembed.core.config import AugmentSettings

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    n = 4 * r.plan.batch_size
    settings = r.settings(r.model_dir(r.plan.model), rows_per_part=r.plan.batch_size * r.plan.views)
    out = compare(lambda tag: r.crops_run(n, tag), settings, AugmentSettings())
    out["crop_views_per_s"] = out["ray_crop_views_per_s"]
    print(f"  ray engine: {out['ray_crop_views_per_s']:.1f} crop-views/s, local engine "
          f"{out['local_crop_views_per_s']:.1f}: ray / local {out['ratio']:.1%} ({out['rows']} rows; Ray start-up "
          f"{out['ray_start_s']:.1f} s apart); stores agree within {out['max_abs_diff']:.2g}")
    return out


def real_crops(r: Run, n: int):
    """``n`` synthetic H&E crops as float [n, 3, H, W] in [0, 1] on the device (what the stage's check sees)."""
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from histoembed.core import store
    from histoembed.inputs.pixels import decode_png

    pngs = pq.read_table(r.crops_run(n, "fast-check") / store.CROPS_FILE, columns=["png"])["png"].to_pylist()
    crops = torch.from_numpy(np.stack([decode_png(b) for b in pngs]))
    return crops.to(r.device).permute(0, 3, 1, 2).float().div_(255)


def section_fast(r: Run) -> dict:
    """Compiled and fp8 forwards against the eager one (see the module docstring), and the stage with the best."""
    import torch

    from histoembed.models.precision import check_precision

    tuned = r.done.get("stage", {})
    bs = tuned.get("batch_size") or r.plan.batch_size
    base = "bf16" if r.cuda else "fp32"
    fp8_ok = not r.cuda or torch.cuda.get_device_capability(r.device) >= (8, 9)
    variants = [(base, False), (base, True), ("fp8", False), ("fp8", True)] if r.cuda else \
        [(base, False), (base, True), ("fp8", False)]  # one compilation on a CPU: seconds, not minutes
    crops = real_crops(r, bs)
    out: dict = {"batch": bs, "variants": {}}
    for precision, compiled in variants:
        name = precision + (" compiled" if compiled else "")
        if r.left_s() < 45 or (precision == "fp8" and not fp8_ok):
            out["variants"][name] = {"skipped": "time budget" if r.left_s() < 45 else "no fp8 on this GPU"}
            continue
        enc = dataclasses.replace(r.encoder(r.plan.model, precision), compile=compiled, fixed_batch=bs)
        start = time.perf_counter()
        enc(crops[:-1])  # the first call compiles, for the padded shape
        r.sync()
        first_s = time.perf_counter() - start
        check = check_precision(enc, crops[:r.plan.cosine_crops])
        m = time_forward(r, enc, bs, r.plan.bare_views, r.plan.bare_cap_s)
        out["variants"][name] = v = {"crops_per_s": m["crops_per_s"], "first_call_s": first_s,
                                     "min_cosine": check.min_cosine, "mean_cosine": check.mean_cosine,
                                     "passed": check.passed}
        print(f"  {name:<15} batch {bs}: {v['crops_per_s']:9.1f} crops/s, first call {first_s:5.1f} s, "
              f"cosine to eager fp32 min {check.min_cosine:.5f} ({'passed' if check.passed else 'FAILED'})")
    measured = {k: v for k, v in out["variants"].items() if "crops_per_s" in v}
    eager = measured.get(base, {}).get("crops_per_s")
    for v in measured.values():
        v["ratio_to_eager"] = v["crops_per_s"] / eager if eager else None
    passing = {k: v for k, v in measured.items() if v["passed"]}
    best = max(passing, key=lambda k: passing[k]["crops_per_s"], default=None)
    out["fastest_passing"] = best
    if best and best != base and tuned.get("crop_views_per_s") and r.left_s() > 60:
        precision, _, compiled = best.partition(" ")
        stage = timed_stage(r, r.plan.model, "fast", precision, n_crops=tuned["crops"], batch_size=bs,
                            workers=tuned["workers"], compile=bool(compiled))
        out["stage"] = {k: stage[k] for k in ("precision", "crops", "crop_views_per_s", "precision_check")}
        out["stage"]["ratio_to_stage"] = stage["crop_views_per_s"] / tuned["crop_views_per_s"]
        print(f"  whole stage with {best}: {stage['crop_views_per_s']:9.1f} crop-views/s, "
              f"{out['stage']['ratio_to_stage']:.1%} of the stage section's {base} eager")
    return out


SECTION_FNS: dict[str, Callable[[Run], dict]] = {
    "env": section_env, "bare": section_bare, "stage": section_stage, "pipeline": section_pipeline,
    "parts": section_parts, "cosine": section_cosine, "autocast": section_autocast, "defaults": section_defaults,
    "fast": section_fast, "ray": section_ray}
# A section starts only with this many seconds of the budget left.
MIN_LEFT_S = {"stage": 60, "pipeline": 40, "parts": 20, "cosine": 15, "autocast": 50, "defaults": 40, "fast": 90,
              "ray": 60}


# ---------------------------------------------------------------- report

def markdown(results: dict) -> str:
    """The run as a markdown table, one line per figure."""
    s = results["sections"]
    env = s.get("env", {})
    lines = [f"# GPU benchmark: {env.get('device_name', '?')}", "",
             f"torch {env.get('torch', '?')}, transformers {env.get('transformers', '?')}, "
             f"python {env.get('python', '?')}, {env.get('cpu_count', '?')} CPUs, "
             f"mode {results['mode']}, {results['seconds']:.0f} s in all. bf16: as the package runs it (on CUDA a "
             "bf16 copy of the weights); bf16-autocast: autocast over the fp32 weights.", "",
             "| section | figure | value | peak GPU MiB |", "|---|---|---:|---:|"]

    def row(sec: str, what: str, value) -> None:
        mem = s.get(sec, {}).get("peak_gpu_mib")
        lines.append(f"| {sec} | {what} | {value} | {'' if mem is None else f'{mem:.0f}'} |")

    for name in SECTIONS:
        sec = s.get(name)
        if sec is None:
            continue
        if "error" in sec or "skipped" in sec:
            row(name, "error" if "error" in sec else "skipped", sec.get("error") or sec.get("skipped"))
            continue
        if name == "bare":
            for precision in ("bf16", "fp32"):
                for bs, m in sec[precision].items():
                    value = f"{m['crops_per_s']:.1f}" if "crops_per_s" in m else m.get("skipped", "")
                    row(name, f"{sec['model']} {precision} batch {bs}, crops/s", value)
        elif name in ("stage", "pipeline", "autocast", "defaults"):
            row(name, f"{sec['model']} {sec['precision']} {sec['views']} views, {sec['crops']} crops, batch "
                      f"{sec['batch_size']}, {sec['workers']} decode workers, crop-views/s",
                f"{sec['crop_views_per_s']:.1f}")
            row(name, "store vs in-memory features, max abs diff (row spread)",
                f"{sec['store_vs_memory_max_abs_diff']:.3g} ({sec['feature_spread']:.3g})")
            if "ratio_to_bare" in sec:
                row(name, f"stage / bare forward (batch {sec['batch_size']})", f"{sec['ratio_to_bare']:.1%}")
                row(name, f"target {sec['target_crop_views_per_s']} crop-views/s",
                    "met" if sec["meets_target"] else "not met")
            if "ratio_to_tuned" in sec:
                t = sec["tuned"]
                row(name, f"defaults / hand-tuned (batch {t['batch_size']}, {t['workers']} workers), target "
                          f"{TARGET_DEFAULTS_SHARE:.0%}", f"{sec['ratio_to_tuned']:.1%}")
        elif name == "parts":
            for k in ("decode_crops_per_s", "augment_views_per_s", "write_rows_per_s", "d2h_rows_per_s"):
                row(name, k.replace("_", " ").replace(" per s", "/s"), f"{sec[k]:.1f}")
            row(name, "augmentation, device vs CPU, max abs pixel diff",
                f"{sec['augment_device_vs_cpu_max_abs_diff']:.2g}")
            row(name, "host waits for the GPU: one augmentation / one batch's views queued",
                f"{sec['augment_host_syncs']} / {sec['queue_views_host_syncs']}")
        elif name == "cosine":
            row(name, f"bf16 vs fp32 min / mean cosine ({sec['rows']} rows)",
                f"{sec['min_cosine']:.5f} / {sec['mean_cosine']:.5f}")
            row(name, "bf16 autocast vs fp32 min / mean cosine",
                f"{sec['autocast_min_cosine']:.5f} / {sec['autocast_mean_cosine']:.5f}")
        elif name == "fast":
            for variant, v in sec["variants"].items():
                if "crops_per_s" not in v:
                    row(name, f"{variant}, crops/s", v["skipped"])
                    continue
                ratio = f", {v['ratio_to_eager']:.2f}x eager" if v.get("ratio_to_eager") else ""
                row(name, f"{variant} batch {sec['batch']}, crops/s (first call {v['first_call_s']:.1f} s; min "
                          f"cosine to fp32 {v['min_cosine']:.5f}, {'passed' if v['passed'] else 'failed'}{ratio})",
                    f"{v['crops_per_s']:.1f}")
            if "stage" in sec:
                row(name, f"whole stage with {sec['fastest_passing']}, crop-views/s ({sec['stage']['crops']} crops; "
                          f"{sec['stage']['ratio_to_stage']:.1%} of the stage section's)",
                    f"{sec['stage']['crop_views_per_s']:.1f}")
        elif name == "ray":
            row(name, f"ray engine crop-views/s ({sec['rows']} rows)", f"{sec['ray_crop_views_per_s']:.1f}")
            row(name, "local engine crop-views/s, same crops", f"{sec['local_crop_views_per_s']:.1f}")
            row(name, "ray / local", f"{sec['ratio']:.1%}")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path | None) -> None:
    if out is None:
        return
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_bench.json", json.dumps(results, indent=2, default=str) + "\n"),
                       ("gpu_bench.md", markdown(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="Tiny model and sizes: every section in seconds on a CPU.")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                    help="Folder for gpu_bench.json and gpu_bench.md (default: $OUT when set).")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    ap.add_argument("--budget-s", type=float, help="Whole-run time budget (default: 270 s, smoke 120 s).")
    ap.add_argument("--workers", type=int, help="PNG decoding processes in the stage.")
    ap.add_argument("--batch-size", type=int, help="Crops per batch in the stage.")
    args = ap.parse_args(argv)

    plan = SMOKE if args.smoke else FULL
    plan = dataclasses.replace(plan, **{k: v for k, v in (("budget_s", args.budget_s), ("workers", args.workers),
                                                           ("batch_size", args.batch_size)) if v is not None})
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: models are built from configs
    import torch

    results: dict = {"mode": "smoke" if args.smoke else "full", "sections": {}, "seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix="histoembed-gpu-bench-") as tmp:
        r = Run(plan, args.device, Path(tmp))
        print(f"histoembed GPU benchmark ({results['mode']}) on {r.device}; results to {args.out or '(stdout only)'}")
        for name in args.sections:
            print(f"[{name}] {time.perf_counter() - r.started:6.1f} s")
            if r.left_s() < MIN_LEFT_S.get(name, 0) * (0.1 if args.smoke else 1):
                sec = {"skipped": f"time budget ({r.left_s():.0f} s left)"}
                print(f"  skipped: {sec['skipped']}")
            else:
                if r.cuda:
                    torch.cuda.reset_peak_memory_stats(r.device)
                start = time.perf_counter()
                try:
                    sec = SECTION_FNS[name](r)
                except Exception as e:  # one section failing must not lose the others
                    traceback.print_exc()
                    sec = {"error": f"{type(e).__name__}: {e}"}
                    print(f"  error: {sec['error']}")
                sec["seconds_in_section"] = time.perf_counter() - start
                if r.cuda:
                    sec["peak_gpu_mib"] = torch.cuda.max_memory_allocated(r.device) / 2**20
                    print(f"  peak GPU memory {sec['peak_gpu_mib']:.0f} MiB")
            results["sections"][name] = r.done[name] = sec
            results["seconds"] = time.perf_counter() - r.started
            write_results(results, args.out)
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
