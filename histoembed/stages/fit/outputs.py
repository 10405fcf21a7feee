"""The fit's outputs: ``models/`` (manifest + one folder per fold), ``calibration.json``,
``oof.parquet`` and ``metrics.json``, each written atomically and keyed, so a re-run with the same
features, labels, QC and settings does nothing; the lock that keeps two fits of one run apart; and
the recovery of what a killed fit left behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from histoembed import __version__
from histoembed.core import feature_store, locks, store
from histoembed.core.config import FitSettings, output_settings
from histoembed.core.errors import UserError, from_os_error
from histoembed.maths import multiscale
from histoembed.maths.resample import spread_over_repeats
from histoembed.models import encoder_fusion
from histoembed.models.heads import decisions, fusion
from histoembed.stages.fit.cv import CVResult
from histoembed.stages.fit.task import oof_view_spread
from histoembed.stages.fit.training import TrainingSet

FUSION_RULE = "sum over heads of w_h * z_h / T_h (weights on the simplex)"
FIT_VERSION = 2  # bump when the fit's outputs change meaning (part of the skip key)


@dataclass
class FitResult:
    run: Path
    skipped: bool                 # True when the outputs were already up to date
    metrics: dict                 # the content of metrics.json
    classes: list[str]
    n_images: int
    excluded_flagged: list[str]
    unlabelled: list[str]
    seconds: float

    @classmethod
    def of(cls, run: Path, ts: TrainingSet, metrics: dict, started: float, skipped: bool = False) -> FitResult:
        return cls(run, skipped, metrics, ts.classes, len(ts.image_ids), ts.excluded_flagged, ts.unlabelled,
                   time.perf_counter() - started)


MULTI_ONLY = ("encoder", "encoder_fusion")  # settings a one-encoder fit's key and manifest leave out (as before them)


def key_settings(settings: FitSettings) -> dict:
    """The settings in a one-encoder fit's key: which store is read is in its features' key already."""
    return {k: v for k, v in output_settings(settings).items() if k not in MULTI_ONLY}


def fit_key(ts: TrainingSet, settings: FitSettings) -> str:
    return store.config_key("fit", FIT_VERSION, key_settings(settings), ts.features.meta.get("key"),
                            ts.fingerprint(), ts.train_crops)


def up_to_date(run: Path, key: str) -> dict | None:
    """metrics.json's content when every output of the fit stage carries ``key``, else None."""
    try:
        manifest = store.read_json(run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE)
        metrics = store.read_json(run / store.METRICS_FILE)
        calib = store.read_json(run / store.CALIBRATION_FILE)
    except UserError:
        return None
    oof_key = store.read_meta(run / store.OOF_FILE).get("key")
    if {manifest.get("key"), metrics.get("key"), calib.get("key"), oof_key} != {key}:
        return None
    folds = manifest.get("folds", 0)
    if not all((store.fold_dir(run / store.MODELS_DIR, k)).is_dir() for k in range(folds)):
        return None
    if store.damaged_model_files(run / store.MODELS_DIR, manifest):
        return None  # a truncated or corrupt model file: fit again rather than say "up to date"
    return metrics


FIT_LOCK = ".fit.lock"


def fit_lock(run: Path):
    """One fit per run at a time: two would both write models/ and the last to finish would win unseen."""
    lock = Path(run) / FIT_LOCK

    def busy(pid: int) -> UserError:
        return UserError(f"another `histoembed fit` (process {pid}) is fitting this run", path=lock,
                         hint="wait for it to finish, then run fit again; if no fit is running, delete this lock file")

    return locks.pid_lock(lock, busy)


def fit_metrics(key: str, encoder: str, ts: TrainingSet, settings: FitSettings, member_list: list,
                encoder_fields: dict, member_word: str, results: list[tuple[CVResult, dict]],
                seeds: list[int]) -> dict:
    """``metrics.json``: the first seed's cross-validated numbers, what they were fitted on, and the seeds' spread."""
    cv, cv_numbers = results[0]
    metrics = {
        "key": key, "version": __version__, "encoder": encoder,
        "classes": ts.classes, "images": len(ts.image_ids), "folds": settings.folds, "seed": settings.seed,
        "excluded_flagged": len(ts.excluded_flagged), "unlabelled": len(ts.unlabelled),
        "artifacts_left_out": ts.artifacts.as_dict(),
        "members": member_list,
        **encoder_fields,
        "scale_fusion": {"mode": settings.scale_fusion, "scales": ts.scales,
                         "rule": multiscale.RULES[settings.scale_fusion]},
        "calibration": f"per fold: each {member_word}'s regularised T, the fusion weights, offsets and conformal "
                       "thresholds chosen on the other folds' OOF predictions (cross-fitting); 'before' is T = 1 "
                       "with the same weights",
        **cv_numbers,
        "final": final_summary(cv.final),
    }
    if len(seeds) > 1:
        metrics["seeds"] = seed_spread(seeds, [m for _, m in results])
    return metrics


def encoder_name(ts: TrainingSet) -> str:
    """The encoder as the feature store names it, in a form ``find_feature_store`` finds again."""
    named = ts.features.meta.get("encoder")
    return named if named and feature_store.encoder_slug(named) == ts.store_dir.name else ts.store_dir.name


def final_summary(final: dict) -> dict:
    """The parameters for the test set, as metrics.json and the manifest show them."""
    return {k: final[k] for k in ("heads", "T", "T_note", "weights", "offsets", "conformal_threshold")}


REPEATED = ("macro_f1", "auroc", "average_precision", "balanced_accuracy", "quadratic_kappa", "accuracy", "nll")


def seed_spread(seeds: list[int], per_seed: list[dict]) -> dict:
    """Repeated cross-validation (``--repeats-cv``): each head's OOF numbers per seed, their mean and spread.

    ``macro_f1`` and ``spread`` keep macro-F1 alone (as before); ``metrics`` has every number of
    :data:`REPEATED` the run reports, per head: ``{"values": [per seed], "repeats", "mean", "std", "min", "max"}``.
    The spread says how much a number moves with the fold assignment alone; the interval, with the cohort.
    """
    out = {"seeds": seeds, "repeats": len(seeds), "macro_f1": {}, "spread": {}, "metrics": {}}
    for head in per_seed[0]["heads"]:
        scores = [m["heads"][head]["macro_f1"] for m in per_seed]
        out["macro_f1"][head] = scores
        out["spread"][head] = {"mean": float(np.mean(scores)), "std": float(np.std(scores, ddof=1)),
                               "min": float(np.min(scores)), "max": float(np.max(scores))}
        out["metrics"][head] = {}
        for name in REPEATED:
            if name in per_seed[0]["heads"][head]:
                values = [_value(m["heads"][head][name]) for m in per_seed]
                out["metrics"][head][name] = {"values": values, **spread_over_repeats(values)}
    return out


def _value(number) -> float | None:
    """A number of metrics.json: a float, or an interval's ``value``."""
    return number.get("value") if isinstance(number, dict) else number


def recover(run: Path) -> None:
    """Undo what a killed fit left: its temporaries go; models/ moved aside and never replaced comes back."""
    run = Path(run)
    store.remove_stale(run, ".*.tmp-*")  # models/ and every file a killed stage was writing
    models = run / store.MODELS_DIR
    for old in sorted(run.glob(f".{store.MODELS_DIR}.old-*")):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not store.pid_alive(int(pid)):
            if models.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, models)


def write_failed(e: OSError, path: Path) -> UserError:
    """A failed write of a fit output as a message naming the file and what to do (free space, fit again)."""
    reason = from_os_error(e).problem
    full = e.errno == errno.ENOSPC or "No space left" in str(e)
    return UserError(f"could not write the fit's outputs: {reason}", path=path,
                     hint=("free space (or choose another --run) and re-run `histoembed fit`" if full else
                           "check that the run folder is writable and has free space, then re-run `histoembed fit`")
                     + "; the previous fit's outputs, if any, are left as they were")


def _final_name(filename, run: Path, tmp: Path) -> Path | None:
    """The output a temporary stands for: ``.models.tmp-PID/fold-00/x`` -> ``models/fold-00/x``, ``.a.tmp-PID`` -> ``a``."""
    if not filename:
        return None
    path = Path(filename)
    with contextlib.suppress(ValueError):
        path = run / store.MODELS_DIR / path.relative_to(tmp)
    if path.name.startswith(".") and ".tmp-" in path.name:
        path = path.with_name(path.name[1:].rsplit(".tmp-", 1)[0])
    return path


def write_outputs(run: Path, ts: TrainingSet, settings: FitSettings, cv: CVResult, metrics: dict,
                  key: str, multi: dict | None = None) -> None:
    """Write every output to a temporary first, then rename them in quick succession, metrics.json last.

    Readers check that the models, calibration.json, oof.parquet and metrics.json carry one key,
    so even a kill between two renames cannot make them mix outputs of two fits.
    """
    models = run / store.MODELS_DIR
    tmp = run / f".{store.MODELS_DIR}.tmp-{os.getpid()}"
    old = run / f".{store.MODELS_DIR}.old-{os.getpid()}"
    recover(run)
    shutil.rmtree(tmp, ignore_errors=True)
    oof = oof_table(ts, cv)
    writing = models          # what is being written, for the message when the disk fills
    swapped = False           # models/ moved aside and the new one renamed in
    try:
        with contextlib.ExitStack() as renames:  # on success, renamed in reverse: calibration, oof, metrics
            metrics_tmp = renames.enter_context(store.atomic_path(run / store.METRICS_FILE))
            oof_tmp = renames.enter_context(store.atomic_path(run / store.OOF_FILE))
            calib_tmp = renames.enter_context(store.atomic_path(run / store.CALIBRATION_FILE))
            for k, fold_models in enumerate(cv.models):
                writing = store.fold_dir(models, k)
                save_fold(store.fold_dir(tmp, k), cv.heads, fold_models, ts.classes, multi)
            writing = models / store.MODELS_MANIFEST_FILE
            store.write_json({**manifest(ts, settings, cv, metrics, key, multi), "files": store.model_files(tmp)},
                             tmp / store.MODELS_MANIFEST_FILE)
            writing = run / store.CALIBRATION_FILE
            calib_tmp.write_text(json.dumps(calibration_record(ts, settings, cv, key), indent=2,
                                            default=store.json_default) + "\n")
            writing = run / store.OOF_FILE
            pq.write_table(oof.replace_schema_metadata(store.with_meta(oof.schema, {
                "key": key, "classes": ts.classes, "heads": cv.heads, "encoder": metrics["encoder"],
                "seed": settings.seed}).metadata), oof_tmp, compression="zstd")
            writing = run / store.METRICS_FILE
            metrics_tmp.write_text(json.dumps(metrics, indent=2, default=store.json_default) + "\n")
            writing = models
            if models.exists():
                os.replace(models, old)
            os.replace(tmp, models)
            swapped = True
    except BaseException as e:
        # No models/ of this fit may outlive a failure: submit would accept it without metrics.json
        # (a first fit) or beside the previous fit's files. The previous models/ comes back.
        if swapped:
            shutil.rmtree(models, ignore_errors=True)
        if old.exists() and not models.exists():
            os.replace(old, models)
        if isinstance(e, OSError):
            raise write_failed(e, _final_name(e.filename, run, tmp) or writing) from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if models.exists():
            shutil.rmtree(old, ignore_errors=True)


def save_fold(folder: Path, heads: list[str], fold_models: list, classes: list[str], multi: dict | None) -> None:
    """One fold's heads; with several encoders' logits fused, each encoder's heads in a folder of its slug."""
    folder.mkdir(parents=True)
    for member, head in zip(heads, fold_models):
        slug = encoder_fusion.split_member(member)[0] if multi and multi["encoder_fusion"] == "logits" else None
        head.save(folder / slug if slug else folder, classes)


def oof_table(ts: TrainingSet, cv: CVResult) -> pa.Table:
    """oof.parquet: per training image its fold, label, every head's OOF logits and the cross-fitted decisions,
    and its patient (``group``) when the data has patients: what compare and the report resample."""
    applied = decisions.apply_cross_fitted(cv.fold_params, cv.fold, cv.z)
    spread = oof_view_spread(cv)
    C = len(ts.classes)
    lst = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(a, np.float32).ravel()), C)  # noqa: E731
    return pa.table({
        "image_id": pa.array(ts.image_ids, pa.string()),
        "split": pa.array(["train"] * len(ts.image_ids), pa.string()),
        "fold": pa.array(cv.fold.astype(np.int32)),
        "label": pa.array([ts.classes[i] for i in ts.y], pa.string()),
        **{f"logits_{h}": lst(cv.z[h]) for h in cv.heads},
        "prob": lst(applied.probs),
        "prediction": pa.array([ts.classes[i] for i in applied.pred], pa.string()),
        "prediction_offsets": pa.array([ts.classes[i] for i in applied.pred_offsets], pa.string()),
        "set": pa.array([[c for c, inside in zip(ts.classes, row) if inside] for row in applied.sets],
                        pa.list_(pa.string())),
        "view_spread": pa.array(spread.astype(np.float32)),
        **({"group": pa.array(ts.patient, pa.string())} if ts.patient is not None else {}),
    })


def manifest(ts: TrainingSet, settings: FitSettings, cv: CVResult, metrics: dict, key: str,
             multi: dict | None) -> dict:
    """models/manifest.json (without its file list): what the fold models were fitted on and how to fuse them."""
    out = {
        "key": key, "version": __version__, "encoder": metrics["encoder"],
        "encoder_slug": ts.store_dir.name, "feature_encoder": ts.features.meta.get("encoder"),
        "dim": int(ts.features.embedding.shape[1]), "classes": ts.classes, "folds": settings.folds,
        "seed": settings.seed, "feature_key": ts.features.meta.get("key"),
        "settings": settings.model_dump(exclude=set(MULTI_ONLY)),
        "train_crops": ts.train_crops, "scale_fusion": settings.scale_fusion, "scales": ts.scales,
        "heads": cv.heads, "final": final_summary(cv.final),
        "submission_uses": metrics["decision"]["submission_uses"],
        "fusion": FUSION_RULE + "; probabilities averaged over folds",
    }
    if multi:
        out.update(multi, settings=settings.model_dump())
    return out


def calibration_record(ts: TrainingSet, settings: FitSettings, cv: CVResult, key: str) -> dict:
    """calibration.json: every fold's cross-fitted parameters, the final ones, and what each fold trained."""
    return {"key": key, "classes": ts.classes, "heads": cv.heads, "rule": FUSION_RULE,
            "weight_grid": [round(w, 6) for w in fusion.weight_grid(settings.weight_grid).tolist()],
            "folds": cv.fold_params, "final": cv.final, "fold_training": cv.fold_info}
