"""`histoembed embed`: embed every crop or slide patch in r views with a frozen encoder into run/features/<encoder>/."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, RunOpt, VerifyDataOpt, command, setting, stage_settings
from histoembed.core.config import Device, Engine, Pool, Precision, StainNorm, StoreDtype
from histoembed.core.console import console, noun
from histoembed.inputs.provenance import run_kinds


@command("embed")
def embed(
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: Annotated[list[str] | None, setting("embed.encoder")] = None,
    pool: Annotated[Pool | None, setting("embed.pool")] = None,
    repeats: Annotated[int | None, setting("embed.repeats")] = None,
    tta: Annotated[bool | None, setting("embed.tta")] = None,
    batch_size: Annotated[int | None, setting("embed.batch_size")] = None,
    device: Annotated[Device | None, setting("embed.device")] = None,
    precision: Annotated[Precision | None, setting("embed.precision")] = None,
    compile: Annotated[bool | None, setting("embed.compile")] = None,
    check_precision: Annotated[bool | None, setting("embed.check_precision")] = None,
    precision_threshold: Annotated[float | None, setting("embed.precision_threshold")] = None,
    fallback_fp32: Annotated[bool | None, setting("embed.fallback_fp32")] = None,
    store_dtype: Annotated[StoreDtype | None, setting("embed.store_dtype")] = None,
    workers: Annotated[int | None, setting("embed.workers")] = None,
    rows_per_part: Annotated[int | None, setting("embed.rows_per_part")] = None,
    threads: Annotated[int | None, setting("embed.threads")] = None,
    seed: Annotated[int | None, setting("embed.seed")] = None,
    engine: Annotated[Engine | None, setting("embed.engine")] = None,
    ray_address: Annotated[str | None, setting("embed.ray_address")] = None,
    ray_actors: Annotated[int | None, setting("embed.ray_actors")] = None,
    ray_actor_cpus: Annotated[float | None, setting("embed.ray_actor_cpus")] = None,
    stain_norm: Annotated[StainNorm | None, setting("embed.stain_norm")] = None,
    stain_target: Annotated[str | None, setting("embed.stain_target", metavar="FILE")] = None,
    stain_min_tissue: Annotated[float | None, setting("embed.stain_min_tissue")] = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", metavar="I/N", help="Embed only the I-th of N deterministic slices of the crops or patches (from "
                                       "0), into this shard's own parts, so N processes or GPUs share one run; readers "
                                       "see all. Default: the whole run, or RANK/WORLD_SIZE under torchrun.")] = None,
    verify_data: VerifyDataOpt = False,
) -> None:
    """Embed every crop (or slide patch) of run/crops.parquet in r views with one or more frozen encoders into
    run/features/<encoder>/.

    Interrupted runs (Ctrl-C, a killed job) resume where they stopped; a finished run with the
    same settings does nothing; changed settings replace the old features.
    """
    settings = stage_settings(config, "embed", encoder=",".join(encoder) if encoder else None, pool=pool,
                              repeats=repeats, tta=tta, batch_size=batch_size, device=device, precision=precision,
                              compile=compile, store_dtype=store_dtype,
                              workers=workers, rows_per_part=rows_per_part, seed=seed,
                              check_precision=check_precision, precision_threshold=precision_threshold,
                              fallback_fp32=fallback_fp32, threads=threads, engine=engine, ray_address=ray_address,
                              ray_actors=ray_actors, ray_actor_cpus=ray_actor_cpus, stain_norm=stain_norm,
                              stain_target=stain_target, stain_min_tissue=stain_min_tissue)
    from histoembed.stages.embed import default_shard, parse_shard, run_embeds  # torch: loaded only to embed

    shard_ = parse_shard(shard) if shard else default_shard()
    for result in run_embeds(run, settings.embed, settings.augment, shard=shard_, verify=verify_data):
        kinds = run_kinds(run)
        if result.removed_parts:
            console.print(f"removed {result.removed_parts} part(s) written with other settings", soft_wrap=True)
        if result.skipped:
            console.print(f"{result.store_dir} is up to date ({result.rows:,} rows, same "
                          f"{noun(*kinds, piece=True, number='s')} and settings); "
                          "nothing to do.", soft_wrap=True)
            continue
        if result.precision_check:
            check = result.precision_check
            verdict = "fell back to fp32" if check.fallback else "passed"
            console.print(f"precision check {verdict}: {check.summary()}", soft_wrap=True)
        rate = result.new_rows / result.seconds if result.seconds else 0.0
        console.print(f"embedded {result.new_rows:,} views ({rate:,.1f}/s) with {result.encoder} "
                      f"({result.dim}-d); {result.rows:,} rows in {result.store_dir}", soft_wrap=True)
        if result.stain:
            console.print(stain_line(result.stain_norm, result.stain, kinds), soft_wrap=True)


def stain_line(method: str, summary: dict, kinds: tuple[int, int] = (1, 0)) -> str:
    """What stain normalisation did to the store's crops (or patches: ``kinds`` is (images, slides)), in words."""
    line = f"stain normalisation ({method}): {summary['normalised']:,} {noun(*kinds, True, '(s)')} normalised"
    if summary["unchanged"]:
        examples = ", ".join(f"{s} {i} {noun(*kinds, True)} {c}" for s, i, c in summary["unchanged_crops"][:3])
        line += (f", {summary['unchanged']:,} passed through unchanged (too little tissue, or not H&E), e.g. "
                 f"{examples}")
    return line
