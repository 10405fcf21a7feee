from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from histoembed.cli.app import ConfigOpt, RunOpt, SeedOpt, command


@command("fit")
def fit(
    run: RunOpt = Path("run"),
    config: ConfigOpt = None,
    encoder: Annotated[str | None, typer.Option(
        "--encoder", help="Which feature store under run/features to fit on (needed when there are several): "
                          "the encoder name, id or folder given to `embed`.")] = None,
    folds: Annotated[int | None, typer.Option(
        "--folds", help="Cross-validation folds (stratified by label, QC duplicate groups kept together).")] = None,
    seed: SeedOpt = None,
    seeds: Annotated[int | None, typer.Option(
        "--seeds", help="Repeat the whole cross-validation with this many seeds (seed, seed+1, ...) and report "
                        "the spread of macro-F1; the first seed's models are kept.")] = None,
    include_flagged: Annotated[bool | None, typer.Option(
        "--include-flagged/--exclude-flagged", show_default=False,
        help="Train on training images that `histoembed qc` flagged (default: leave them out).")] = None,
    mlp_hidden: Annotated[int | None, typer.Option("--mlp-hidden", help="MLP hidden units per layer.")] = None,
    mlp_depth: Annotated[int | None, typer.Option("--mlp-depth", help="MLP hidden layers (0: linear head).")] = None,
    mlp_epochs: Annotated[int | None, typer.Option(
        "--mlp-epochs", help="Most MLP epochs (early stopping on the inner split usually ends sooner).")] = None,
    mixup: Annotated[float | None, typer.Option(
        "--mixup", help="MixUp Beta(alpha, alpha) for the MLP; 0 turns it off.")] = None,
    xgb_rounds: Annotated[int | None, typer.Option(
        "--xgb-rounds", help="Most XGBoost rounds (early stopping on the inner split usually ends sooner).")] = None,
    pca_dims: Annotated[int | None, typer.Option(
        "--pca-dims", help="XGBoost: PCA (fitted inside each fold) to this many dims; 0 turns it off.")] = None,
    bootstrap: Annotated[int | None, typer.Option(
        "--bootstrap", help="Bootstrap resamples for the macro-F1 95% interval (0: none).")] = None,
    heads: Annotated[str | None, typer.Option(
        "--heads", help="Comma-separated heads to cross-validate and fuse: mlp, xgb (the reference recipe, "
                        "default), logreg (linear probe on image means), abmil (gated attention-MIL over crops).")] = None,
    offsets: Annotated[str | None, typer.Option(
        "--offsets", help="Per-class offsets on the fused log-probabilities for the submission: on, off, or auto "
                          "(on when their cross-fitted macro-F1 beats plain argmax). Both scores are always reported.")] = None,
    alpha: Annotated[float | None, typer.Option(
        "--alpha", help="Conformal prediction sets contain the true class with probability 1 - alpha.")] = None,
    class_conditional: Annotated[bool | None, typer.Option(
        "--class-conditional/--marginal", show_default=False,
        help="Conformal thresholds per class (every class covered at 1 - alpha, larger sets) "
             "instead of one threshold (default).")] = None,
) -> None:
    """Cross-validate heads on the training features; calibrate, fuse, choose class offsets and conformal sets.

    Writes run/models/, run/calibration.json, run/oof.parquet and run/metrics.json.

    Every reported number comes from predictions whose model, temperatures, fusion weights, offsets and
    conformal thresholds never saw the image.

    Other settings: the fit, fit.mlp, fit.xgb, fit.logreg and fit.abmil tables of histoembed.toml.
    """
    from histoembed import config as cfg
    from histoembed.console import console
    from histoembed.fit import run_fit
    from histoembed.heads import check_names

    settings = cfg.load_settings(config)
    fit_settings = cfg.updated(settings.fit, folds=folds, seed=seed, seeds=seeds, include_flagged=include_flagged,
                               bootstrap=bootstrap, offsets=offsets, alpha=alpha, class_conditional=class_conditional,
                               heads=None if heads is None else check_names(heads.split(",")))
    fit_settings.mlp = cfg.updated(fit_settings.mlp, hidden=mlp_hidden, depth=mlp_depth, epochs=mlp_epochs,
                                   mixup_alpha=mixup)
    fit_settings.xgb = cfg.updated(fit_settings.xgb, n_estimators=xgb_rounds, pca_dims=pca_dims)
    result = run_fit(run, fit_settings, encoder=encoder)
    if result.skipped:
        console.print(f"{run}/models is up to date (same features, labels, QC and settings); nothing to do.",
                      soft_wrap=True)
    print_summary(result.metrics)
    if not result.skipped:
        console.print(f"wrote {run}/models, calibration.json, oof.parquet, metrics.json "
                      f"in {result.seconds:.1f} s", soft_wrap=True)


def print_summary(metrics: dict) -> None:
    from histoembed.console import console, table

    rows = []
    for head, m in metrics["heads"].items():
        ci = f"{m['macro_f1_ci'][0]:.2f}-{m['macro_f1_ci'][1]:.2f}" if m.get("macro_f1_ci") else "-"
        rows.append([head, m["macro_f1"], ci, f"{m['fold_mean']:.2f}±{m['fold_std']:.2f}", m["accuracy"],
                     f"{m['nll_before_calibration']:.2f}→{m['nll']:.2f}",
                     f"{m['ece_before_calibration']:.2f}→{m['ece']:.2f}"])
    flagged = metrics.get("excluded_flagged")
    table(f"Out of fold: {metrics['images']} images, {metrics['folds']} folds, seed {metrics['seed']}"
          + (f" ({flagged} QC-flagged left out)" if flagged else ""),
          ["head", "macro-F1", "95% CI", "folds", "acc.", "NLL T=1→T", "ECE T=1→T"], rows)
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
    for note in metrics.get("calibration_notes", []):
        console.print(f"[yellow]calibration:[/] {note}", soft_wrap=True)
    final = metrics.get("final")
    if final:
        parts = ", ".join(f"{h}: T {final['T'][h]:.3f}, w {final['weights'][h]:.2f}" for h in final["heads"])
        console.print(f"for the test set: {parts} (chosen on all out-of-fold predictions)", soft_wrap=True)
    spread = metrics.get("seeds")
    if spread:
        for head, s in spread["spread"].items():
            scores = ", ".join(f"{v:.3f}" for v in spread["macro_f1"][head])
            console.print(f"{head}: macro-F1 over seeds {spread['seeds']}: {scores} "
                          f"(mean {s['mean']:.3f}, std {s['std']:.3f}, range {s['max'] - s['min']:.3f})",
                          soft_wrap=True)
