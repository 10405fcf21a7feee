"""`histoembed fit`: cross-validate, calibrate and fuse the heads on the training features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pyarrow.parquet as pq

from histoembed.cli import drift as drift_cli
from histoembed.cli.app import ConfigOpt, RunOpt, command, setting, stage_settings
from histoembed.core import store
from histoembed.core.config import (ARTIFACTS, EncoderFusion, Engine, Offsets, RegressionLoss, ScaleFusion,
                                     SelectBy, StreamBags, TaskName)
from histoembed.core.console import console, items, noun, table
from histoembed.core.errors import UserError
from histoembed.inputs import patch_flags
from histoembed.inputs.provenance import run_kinds
from histoembed.stages.drift import run_drift
from histoembed.stages.fit import parse_encoders, run_fit
from histoembed.models.heads import check_names


@command("fit")
def fit(
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: Annotated[str | None, setting("fit.encoder", metavar="ENCODER[,ENCODER]")] = None,
    encoder_fusion: Annotated[EncoderFusion | None, setting("fit.encoder_fusion")] = None,
    folds: Annotated[int | None, setting("fit.folds")] = None,
    seed: Annotated[int | None, setting("fit.seed")] = None,
    seeds: Annotated[int | None, setting("fit.seeds", "--repeats-cv", "--seeds")] = None,
    include_flagged: Annotated[bool | None, setting("fit.include_flagged", "--include-flagged/--exclude-flagged")]
        = None,
    mlp_hidden: Annotated[int | None, setting("fit.mlp.hidden", "--mlp-hidden")] = None,
    mlp_depth: Annotated[int | None, setting("fit.mlp.depth", "--mlp-depth")] = None,
    mlp_epochs: Annotated[int | None, setting("fit.mlp.epochs", "--mlp-epochs")] = None,
    mixup: Annotated[float | None, setting("fit.mlp.mixup_alpha", "--mixup")] = None,
    xgb_rounds: Annotated[int | None, setting("fit.xgb.n_estimators", "--xgb-rounds")] = None,
    pca_dims: Annotated[int | None, setting("fit.xgb.pca_dims")] = None,
    bootstrap: Annotated[int | None, setting("fit.bootstrap")] = None,
    threads: Annotated[int | None, setting("fit.threads")] = None,
    heads: Annotated[str | None, setting("fit.heads", metavar="HEAD,HEAD")] = None,
    offsets: Annotated[Offsets | None, setting("fit.offsets")] = None,
    select_by: Annotated[SelectBy | None, setting("fit.select_by")] = None,
    class_order: Annotated[str | None, setting("fit.class_order", metavar="CLASS,CLASS")] = None,
    ordinal: Annotated[bool | None, setting("fit.ordinal")] = None,
    alpha: Annotated[float | None, setting("fit.alpha")] = None,
    class_conditional: Annotated[bool | None, setting("fit.class_conditional", "--class-conditional/--marginal")]
        = None,
    scale_fusion: Annotated[ScaleFusion | None, setting("fit.scale_fusion")] = None,
    keep_artifacts: Annotated[str | None, setting("fit.keep_artifacts", metavar="KIND,KIND")] = None,
    task: Annotated[TaskName | None, setting("fit.task")] = None,
    time_column: Annotated[str | None, setting("fit.time_column")] = None,
    event_column: Annotated[str | None, setting("fit.event_column")] = None,
    target_column: Annotated[str | None, setting("fit.target_column")] = None,
    strict: Annotated[bool | None, setting("fit.strict", "--strict/--skip-bad-rows")] = None,
    regression_loss: Annotated[RegressionLoss | None, setting("fit.regression_loss")] = None,
    engine: Annotated[Engine | None, setting("fit.engine")] = None,
    ray_address: Annotated[str | None, setting("fit.ray_address")] = None,
    memory_gb: Annotated[float | None, setting("fit.memory_gb")] = None,
    stream: Annotated[StreamBags | None, setting("fit.stream")] = None,
) -> None:
    """Cross-validate heads on the training features; calibrate, fuse, choose class offsets and conformal sets.

    Writes run/models/, run/calibration.json, run/oof.parquet and run/metrics.json; then checks whether the
    test images (or slides) look like the training ones (run/drift.json, see `histoembed drift`).

    Every reported number comes from predictions whose model, temperatures, fusion weights, offsets and
    conformal thresholds never saw the image.

    Several encoders (--encoder A,B after `histoembed embed --encoder A --encoder B`): every head is fitted on
    each encoder's store on the same folds and all (encoder, head) members are fused (--encoder-fusion logits),
    or each head reads the encoders' embeddings side by side (--encoder-fusion concat).

    Survival (--task survival: time and event columns in the manifest or train_labels.csv) and regression
    (--task regression: a target column): the heads predict a risk (higher = earlier event) or the target, are
    fused with cross-fitted weights, and are measured by the C-index or R² (docs/stages.md).

    Other settings: the fit, fit.mlp, fit.xgb, fit.logreg, fit.abmil and drift tables of histoembed.toml.
    """
    settings = stage_settings(config, "fit", folds=folds, seed=seed, seeds=seeds, include_flagged=include_flagged,
                                  bootstrap=bootstrap, offsets=offsets, alpha=alpha, threads=threads,
                                  select_by=select_by, ordinal=ordinal,
                                  class_order=None if class_order is None else
                                  [c.strip() for c in class_order.split(",") if c.strip()],
                                  class_conditional=class_conditional, scale_fusion=scale_fusion,
                                  encoder=encoder, encoder_fusion=encoder_fusion,
                                  keep_artifacts=_parse_artifacts(keep_artifacts),
                                  task=task,
                                  time_column=time_column, event_column=event_column, target_column=target_column,
                                  strict=strict, regression_loss=regression_loss, engine=engine,
                                  ray_address=ray_address, memory_gb=memory_gb, stream=stream,
                                  heads=None if heads is None else check_names(heads.split(",")),
                                  mlp=dict(hidden=mlp_hidden, depth=mlp_depth, epochs=mlp_epochs, mixup_alpha=mixup),
                                  xgb=dict(n_estimators=xgb_rounds, pca_dims=pca_dims))
    result = run_fit(run, settings.fit)
    encoders = parse_encoders(settings.fit.encoder)
    if result.unlabelled:
        missing = (f"no usable {' and '.join(result.metrics['outcome_columns'])} row in "
                   f"{Path(result.metrics['outcome_file']).name}" if "task" in result.metrics
                   else "no label in crops.parquet")
        console.print(f"[yellow]note:[/] {len(result.unlabelled)} training {_noun(run, result.unlabelled)} in "
                      f"the features have {missing} and were left out (e.g. {result.unlabelled[0]})",
                      soft_wrap=True)
    if result.excluded_flagged:
        console.print(f"QC: {len(result.excluded_flagged)} flagged training {_noun(run, result.excluded_flagged)} "
                      "left out (--include-flagged keeps them)", soft_wrap=True)
    left_out = result.metrics.get("artifacts_left_out")
    said = patch_flags.describe(patch_flags.LeftOut(**left_out), settings.fit.keep_artifacts) if left_out else None
    if said:
        console.print(said, soft_wrap=True)
    if result.skipped:
        console.print(f"{run}/models is up to date (same features, labels, QC and settings); nothing to do.",
                      soft_wrap=True)
    if "task" in result.metrics:
        print_outcome_summary(result.metrics, _trained(run, result.metrics["images"]))
    else:
        print_summary(result.metrics, _trained(run, result.metrics["images"]))
    if not result.skipped:
        console.print(f"wrote {run}/models, calibration.json, oof.parquet, metrics.json "
                      f"in {result.seconds:.1f} s", soft_wrap=True)
    try:  # the models are written: a failed check must not make the fit look failed
        if len(encoders) > 1:
            console.print(f"drift check on the first encoder's features ({encoders[0]})", soft_wrap=True)
        drift_cli.show(run_drift(run, settings.drift, encoder=encoders[0] if encoders else None))
    except (UserError, OSError) as e:
        console.print(f"[yellow]drift check skipped:[/] {e}", soft_wrap=True)


def _parse_artifacts(text: str | None) -> list[str] | None:
    """``--keep-artifacts blur,ink``: the artifact flags named, each one known."""
    if text is None:
        return None
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in ARTIFACTS]
    if unknown:
        raise UserError(f"--keep-artifacts names {', '.join(map(repr, unknown))}, not an artifact flag",
                        hint=f"choose among {', '.join(ARTIFACTS)}, comma-separated (e.g. --keep-artifacts blur,fold)")
    return [k for k in ARTIFACTS if k in kinds]   # one order: `ink,blur` and `blur,ink` are one setting and key


def temperature_cell(decision: dict | None) -> str:
    """The table's T column: the T for the test set, 1 when none is applied."""
    if not decision:
        return "-"
    if "folds" not in decision:   # the fused decision: the heads' temperatures or none
        return "heads'" if decision["applied"] else "1"
    return f"{decision['T']:.2f}" if decision["applied"] else "1"


def temperature_line(head: str, decision: dict) -> str:
    """One head's calibration decision in words: where a T is applied and why."""
    if "folds" not in decision:
        return f"calibration, {head}: " + ("the heads' temperatures" if decision["applied"] else "T = 1") \
            + f" ({decision['why']})"
    where = f"applied in {decision['folds_applied']} of {decision['folds']} folds"
    if decision["applied"]:
        return f"calibration, {head}: T = {decision['T']:.3g} for the test set, {where} ({decision['why']})"
    return f"calibration, {head}: T = 1 for the test set, {where} (T = 1 because {decision['why']})"


def _noun(run: Path, names: list[str]) -> str:
    """"image(s)", "slide(s)" or both, for these training items."""
    return noun(*run_kinds(run, [f"train/{name}" for name in names]), number="(s)")


def _trained(run: Path, n: int) -> tuple[int, int]:
    """(images, slides) among the ``n`` training items of the out-of-fold table."""
    oof = run / store.OOF_FILE
    if not run_kinds(run)[1] or not oof.exists():
        return n, 0
    ids = pq.read_table(oof, columns=["image_id"])["image_id"].to_pylist()
    return run_kinds(run, [f"train/{i}" for i in dict.fromkeys(ids)])


def print_summary(metrics: dict, kinds: tuple[int, int] | None = None) -> None:
    """The out-of-fold table; ``kinds``: (images, slides) the metrics count (all images when not given)."""
    rows = []
    temps = metrics.get("temperatures", {})
    for head, m in metrics["heads"].items():
        ci = f"{m['macro_f1_ci'][0]:.2f}-{m['macro_f1_ci'][1]:.2f}" if m.get("macro_f1_ci") else "-"
        rows.append([head, m["macro_f1"], ci, f"{m['fold_mean']:.2f}±{m['fold_std']:.2f}", m["accuracy"],
                     f"{m['nll_before_calibration']:.2f}→{m['nll']:.2f}",
                     f"{m['ece_before_calibration']:.2f}→{m['ece']:.2f}", temperature_cell(temps.get(head))])
    flagged = metrics.get("excluded_flagged")
    table(f"Out of fold: {items(*(kinds or (metrics['images'], 0)))}, {metrics['folds']} folds, seed {metrics['seed']}"
          + (f" ({flagged} QC-flagged left out)" if flagged else ""),
          ["head", "macro-F1", "95% CI", "folds", "acc.", "NLL T=1→T", "ECE T=1→T", "T"], rows)
    for head, decision in temps.items():
        if decision:
            console.print(temperature_line(head, decision), soft_wrap=True)
    field_numbers(metrics)
    sf = metrics.get("scale_fusion")
    if sf and (len(sf["scales"]) > 1 or sf["mode"] != "crops"):
        console.print(f"crop scales {', '.join(f'{s:g}' for s in sf['scales'])}, scale fusion {sf['mode']}: "
                      f"{sf['rule']}", soft_wrap=True)
    decision = metrics.get("decision")
    if decision:
        off = decision["offsets"]
        console.print(f"fused, plain argmax: macro-F1 {decision['argmax']['macro_f1']:.3f}; with class offsets: "
                      f"{off['macro_f1']:.3f} (cross-fitted); the submission uses {decision['submission_uses']} "
                      f"(--offsets {decision['offsets_setting']})", soft_wrap=True)
    conf = metrics.get("conformal")
    if conf:
        per_class = ", ".join(f"{c} {v:.2f}" for c, v in conf["coverage_per_class"].items() if v is not None)
        console.print(f"conformal sets at alpha {conf['alpha']}: coverage {conf['coverage']:.3f} "
                      f"(target {conf['target_coverage']:.2f}; {per_class}), mean set size "
                      f"{conf['mean_set_size']:.2f}, empty {conf['empty_sets']:.1%}", soft_wrap=True)
    if metrics.get("encoders"):
        mode = metrics.get("encoder_fusion", {}).get("mode", "logits")
        table(f"Encoders ({mode} fusion): each member out of fold, its final weight, and the fused score",
              ["member", "encoder", "head", "macro-F1", "weight"],
              [[m["member"], m["encoder"], m["head"], m["oof_macro_f1"], m["weight"]] for m in metrics["members"]]
              + [["fused", "", "", metrics["heads"]["fused"]["macro_f1"], 1.0]])
    notes = metrics.get("calibration_notes", [])
    for note in notes if not temps else []:   # older metrics.json: no decision per head above
        console.print(f"[yellow]calibration:[/] {note}", soft_wrap=True)
    final = metrics.get("final")
    if final:
        parts = ", ".join(f"{h}: T {final['T'][h]:.3f}, w {final['weights'][h]:.2f}" for h in final["heads"])
        console.print(f"for the test set: {parts} (chosen on all out-of-fold predictions)", soft_wrap=True)
    spread = metrics.get("seeds")
    if spread:
        for head, stats in spread["spread"].items():
            scores = ", ".join(f"{v:.3f}" for v in spread["macro_f1"][head])
            console.print(f"{head}: macro-F1 over seeds {spread['seeds']}: {scores} "
                          f"(mean {stats['mean']:.3f}, std {stats['std']:.3f}, "
                          f"range {stats['max'] - stats['min']:.3f})",
                          soft_wrap=True)
        repeated_numbers(spread)


FIELD = (("auroc", "AUROC"), ("average_precision", "AP"), ("balanced_accuracy", "bal. acc."),
         ("quadratic_kappa", "kappa (quadratic)"))


def _interval(number: dict | None) -> str:
    if not isinstance(number, dict) or number.get("value") is None:
        return "-"
    ci = f" [{number['lo']:.2f}, {number['hi']:.2f}]" if number.get("lo") is not None else ""
    return f"{number['value']:.3f}{ci}"


def field_numbers(metrics: dict) -> None:
    """AUROC, AP, balanced accuracy and kappa of each head with their intervals, and what the intervals drew."""
    heads = metrics["heads"]
    shown = [(k, name) for k, name in FIELD if any(k in m for m in heads.values())]
    if not shown:
        return
    iv = metrics.get("intervals") or {}
    drawn = (f"{iv.get('patients')} patients" if iv.get("unit") == "patients" else f"{metrics['images']} images")
    binary = f", AUROC and AP of {iv['positive_class']}" if iv.get("positive_class") else ", AUROC and AP one-vs-rest macro"
    table(f"Out of fold: 95% intervals from {iv.get('resamples', 0)} resamples of the {drawn}{binary}",
          ["head", *(name for _, name in shown)], [[head, *(_interval(m.get(k)) for k, _ in shown)]
                                                   for head, m in heads.items()])


def repeated_numbers(spread: dict) -> None:
    """--repeats-cv: the fused numbers' mean and spread over the repeats."""
    fused = (spread.get("metrics") or {}).get("fused") or {}
    parts = [f"{name} {s['mean']:.3f} ± {s['std']:.3f}" for name, s in fused.items()
             if s.get("mean") is not None and s.get("std") is not None]
    if parts:
        console.print(f"fused over {spread['repeats']} repeats of the cross-validation (mean ± std): "
                      + ", ".join(parts), soft_wrap=True)


def _ci(number: dict) -> str:
    lo, hi = number.get("lo"), number.get("hi")
    return f"{lo:.2f}-{hi:.2f}" if lo is not None and hi is not None and lo == lo and hi == hi else "-"


def print_outcome_summary(metrics: dict, kinds: tuple[int, int] | None = None) -> None:
    """Survival or regression: the task and where it came from, skipped rows, each head's out-of-fold numbers."""
    task = metrics["task"]
    console.print(f"task: {task} ({metrics.get('task_from', '')})", soft_wrap=True)
    for line in metrics.get("skipped_rows", [])[:10]:
        console.print(f"[yellow]skipped:[/] {line}", soft_wrap=True)
    if len(metrics.get("skipped_rows", [])) > 10:
        console.print(f"[yellow]skipped:[/] and {len(metrics['skipped_rows']) - 10} more rows", soft_wrap=True)
    where = f"Out of fold: {items(*(kinds or (metrics['images'], 0)))}, {metrics['folds']} folds, seed {metrics['seed']}"
    if task == "survival":
        rows = [[h, m["harrell_c"]["value"], _ci(m["harrell_c"]), m["uno_c"]["value"], _ci(m["uno_c"]),
                 m["risk_halves"]["logrank_p"] if m["risk_halves"]["logrank_p"] is not None else "-"]
                for h, m in metrics["heads"].items()]
        table(where + f", {metrics.get('events', '?')} events", ["head", "C-index", "95% CI", "Uno's C", "95% CI",
                                                                   "log-rank p"], rows)
    else:
        rows = [[h, m["r2"]["value"], _ci(m["r2"]), m["pearson_r"]["value"], m["spearman_r"]["value"],
                 m["mae"]["value"]] for h, m in metrics["heads"].items()]
        table(where, ["head", "R²", "95% CI", "Pearson r", "Spearman r", "MAE"], rows)
        conf = metrics["conformal"]
        console.print(f"conformal intervals at alpha {conf['alpha']}: coverage {conf['coverage']:.3f} (target "
                      f"{conf['target_coverage']:.2f}), for the test set prediction ± {conf['half_width']}",
                      soft_wrap=True)
    weights = ", ".join(f"{h}: w {w:.2f}" for h, w in metrics["fusion"]["weights"].items())
    console.print(f"for the test set: {weights} (chosen on all out-of-fold predictions)", soft_wrap=True)
    spread, name = metrics.get("seeds"), {"c_index": "C-index", "r2": "R²"}[metrics["score"]]
    for head, stats in (spread or {}).get("spread", {}).items():
        console.print(f"{head}: {name} over seeds {spread['seeds']}: "
                      + ", ".join(f"{v:.3f}" for v in spread[metrics["score"]][head])
                      + f" (mean {stats['mean']:.3f}, std {stats['std']:.3f})", soft_wrap=True)
