from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, EncoderOpt, RunOpt, SeedOpt, command


@command("embed")
def embed(
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: EncoderOpt = None,
    pool: Annotated[str | None, typer.Option(
        "--pool", help="ViT token pooling: auto (the registry entry's rule: cls+mean for Virchow2 and Midnight, "
                       "cls elsewhere), cls (the CLS token), mean (mean of the patch tokens, registers left out) "
                       "or cls+mean (both, concatenated). Default auto.")] = None,
    repeats: Annotated[int | None, typer.Option(
        "--repeats", help="Views per crop: view 0 is the clean crop, views 1..r-1 are augmented (default 4).")]
        = None,
    tta: Annotated[bool | None, typer.Option(
        "--tta/--no-tta", help="Embed test crops with the same augmented views (test-time augmentation); "
                               "--no-tta embeds view 0 only. Default on.")] = None,
    batch_size: Annotated[int | None, typer.Option(
        "--batch-size", help="Crops per forward pass (default 64; raise it on a large GPU).")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", help="auto (CUDA when present), cpu or cuda: where augmentation and the encoder run.")] = None,
    precision: Annotated[str | None, typer.Option(
        "--precision", help="auto (the encoder's CUDA precision, bf16 autocast unless its entry says otherwise, "
                            "on CUDA; fp32 on CPU), fp32, bf16 or fp16.")] = None,
    check_precision: Annotated[bool | None, typer.Option(
        "--check-precision/--no-check-precision",
        help="Before embedding, compare the chosen precision with fp32 on the first batch of real crops (cosine "
             "per crop, NaN/Inf) and stop with the figures when a crop falls below --precision-threshold. "
             "Default: on when a GPU runs below fp32; works on the CPU too (with --precision bf16).")] = None,
    precision_threshold: Annotated[float | None, typer.Option(
        "--precision-threshold", help="Lowest cosine to fp32 a crop may have in the check (default 0.999).")] = None,
    fallback_fp32: Annotated[bool | None, typer.Option(
        "--fallback-fp32", help="When the precision check fails, embed in fp32 instead of stopping.")] = None,
    store_dtype: Annotated[str | None, typer.Option(
        "--store-dtype", help="float32 (default) or float16 embeddings in the store (half the disk).")] = None,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Processes decoding crop PNGs (default 2; 0: in this process).")] = None,
    rows_per_part: Annotated[int | None, typer.Option(
        "--rows-per-part", help="Rows per Parquet part: an interrupted run loses at most one part (default 4096).")]
        = None,
    seed: SeedOpt = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", help="Embed only the I-th of N deterministic slices of the crops (from 0), into "
                                       "this shard's own parts, so N processes or GPUs share one run; readers see "
                                       "all. Default: the whole run, or RANK/WORLD_SIZE under torchrun.")] = None,
) -> None:
    """Embed every crop of run/crops.parquet in r views with a frozen encoder into run/features/<encoder>/.

    Interrupted runs (Ctrl-C, a killed job) resume where they stopped; a finished run with the
    same settings does nothing; changed settings replace the old features.
    """
    from histoembed import config as cfg
    from histoembed.console import console
    from histoembed.embed import default_shard, parse_shard, run_embed

    settings = cfg.load_settings(config)
    embed_settings = cfg.updated(settings.embed, encoder=encoder, pool=pool, repeats=repeats, tta=tta,
                                 batch_size=batch_size, device=device, precision=precision, store_dtype=store_dtype,
                                 workers=workers, rows_per_part=rows_per_part, seed=seed,
                                 check_precision=check_precision, precision_threshold=precision_threshold,
                                 fallback_fp32=fallback_fp32)
    result = run_embed(run, embed_settings, settings.augment, shard=parse_shard(shard) if shard else default_shard())
    if result.removed_parts:
        console.print(f"removed {result.removed_parts} part(s) written with other settings", soft_wrap=True)
    if result.skipped:
        console.print(f"{result.store_dir} is up to date ({result.rows:,} rows, same crops and settings); "
                      "nothing to do.", soft_wrap=True)
        return
    if result.precision_check:
        check = result.precision_check
        verdict = "fell back to fp32" if check.fallback else "passed"
        console.print(f"precision check {verdict}: {check.summary()}", soft_wrap=True)
    rate = result.new_rows / result.seconds if result.seconds else 0.0
    console.print(f"embedded {result.new_rows:,} views ({rate:,.1f}/s) with {result.encoder} "
                  f"({result.dim}-d); {result.rows:,} rows in {result.store_dir}", soft_wrap=True)
