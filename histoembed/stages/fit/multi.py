"""``fit --encoder A,B``: every head on each encoder's store, the same folds, all members fused.

The stores must hold exactly the same (split, image, crop, view) rows. In logits mode each store is
read, fitted and let go before the next one is read, so only one store's features are in memory at
a time, or none when a store is too big for memory: its bags are then streamed from it slide by
slide (``streaming``, issue 37). Members are named ``slug/head``. Concat mode holds them all, side by
side, and fits each head once on the joined embeddings.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from histoembed.core import feature_store, store
from histoembed.core.config import FitSettings, output_settings
from histoembed.core.console import progress
from histoembed.core.errors import UserError
from histoembed.models import encoder_fusion
from histoembed.models.heads import Bags, Head
from histoembed.stages.fit import engines, streaming
from histoembed.stages.fit.cv import CVResult, fit_heads, seeds_of
from histoembed.stages.fit.folds import make_folds
from histoembed.stages.fit.outputs import (FIT_VERSION, FitResult, fit_lock, fit_metrics, recover, up_to_date,
                                           write_outputs)
from histoembed.stages.fit.task import class_order, classification
from histoembed.stages.fit.training import TrainingSet, check_class_counts, load_training_set

MULTI_NLL_IMAGES = 2.0  # several encoders: weights by NLL within two images' worth of the best macro-F1 (fusion.py)


@dataclass
class EncoderPart:
    """One encoder of a multi-encoder fit: its store and what the manifest records of it."""

    name: str                     # as given (find_feature_store finds it again)
    store_dir: Path
    meta: dict                    # the store's metadata (its first part's)
    dim: int = 0
    scaling: dict | None = None   # concat mode: encoder_fusion.block_scaling of its training rows

    def record(self) -> dict:
        out = {"encoder": self.name, "slug": self.store_dir.name, "feature_encoder": self.meta.get("encoder"),
               "dim": self.dim, "feature_key": self.meta.get("key")}
        return out if self.scaling is None else {**out, "scaling": self.scaling}


def run_fit_multi(run: Path, settings: FitSettings, names: list[str], started: float) -> FitResult:
    """Every head on each of the encoders ``names``, the same folds, all members fused (see the module docstring)."""
    parts = [EncoderPart(name, feature_store.find_feature_store(run, name), {}) for name in names]
    feature_store.check_same_rows({p.name: p.store_dir for p in parts})
    for p in parts:
        p.meta = store.read_meta(feature_store.feature_parts(p.store_dir)[0])
    logits = settings.encoder_fusion == "logits"   # concat joins the stores' rows in memory
    first, first_streamed = streaming.load(run, names[0], settings, keep_dtype=logits, may_stream=logits)
    check_class_counts(run, first, settings)
    class_order(first.classes, settings)   # a wrong class_order is said before any fitting
    key = store.config_key("fit", FIT_VERSION, output_settings(settings), "encoders",
                           [[p.store_dir.name, p.meta.get("key")] for p in parts], first.fingerprint(),
                           first.train_crops)
    with fit_lock(run):
        recover(run)
        done = up_to_date(run, key)
        if done is not None:
            return FitResult.of(run, first, done, started, skipped=True)
        return _fit_multi(run, settings, parts, first, first_streamed, key, started)


def _same_images(first: TrainingSet, ts: TrainingSet, part: EncoderPart) -> None:
    if ts.image_ids != first.image_ids or not np.array_equal(ts.y, first.y) or ts.scales != first.scales:
        raise UserError(f"the training images of encoder {part.name!r} differ from those of the first encoder",
                        path=part.store_dir, hint=f"run `histoembed embed --encoder {part.name}` on the same crops")


@dataclass
class Members:
    """Every member's OOF logits per seed, gathered as the encoders are fitted one after another."""

    run: Path
    settings: FitSettings
    first: TrainingSet
    seeds: list[int]
    folds: list[np.ndarray]       # per seed, the fold of each image (the same for every encoder)
    names: list[str] = field(default_factory=list)
    z: list[dict] = field(default_factory=list)
    z_bags: list[dict] = field(default_factory=list)
    models: list[list[Head]] = field(default_factory=list)
    info: list[dict] = field(default_factory=list)
    bag_image: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.z, self.z_bags = [{} for _ in self.seeds], [{} for _ in self.seeds]
        self.models = [[] for _ in range(self.settings.folds)]
        self.info = [{} for _ in range(self.settings.folds)]

    def fit(self, bags: Bags, label: str, member, encoder: str | None = None) -> None:
        """Every head on ``bags`` for every seed; ``member(head)`` names the member (first seed's models kept)."""
        settings, first = self.settings, self.first
        if self.bag_image is not None and not np.array_equal(self.bag_image, bags.image):
            raise UserError("the encoders' stores hold different views of an image",
                            path=self.run / store.FEATURES_DIR, hint="embed every encoder with the same --repeats")
        self.bag_image = bags.image
        with progress("folds") as bar:
            for s, seed in enumerate(self.seeds):
                task = bar.add_task(f"fit {label}, seed {seed}", total=settings.folds)
                zs, zbs, fold_models, fold_info = fit_heads(bags, first.y, first.groups, settings, seed,
                                                            len(first.classes), self.folds[s],
                                                            on_fold=lambda k, t=task: bar.advance(t),
                                                            runner=engines.runner_for(self.run, encoder, settings,
                                                                                      first.image_ids, first.classes))
                for h in settings.heads:
                    self.z[s][member(h)], self.z_bags[s][member(h)] = zs[h], zbs[h]
                if s == 0:
                    for k in range(settings.folds):
                        self.models[k].extend(fold_models[k])
                        self.info[k].update({("fold" if n == "fold" or n.endswith("_images") else member(n)): v
                                             for n, v in fold_info[k].items()})
        self.names.extend(member(h) for h in settings.heads)


def _fit_each_encoder(run: Path, settings: FitSettings, parts: list[EncoderPart], fitted: Members,
                      first_streamed: streaming.Streamed | None) -> None:
    """Logits mode: each encoder's store read (or streamed), its heads fitted, and its features let go before the
    next."""
    first = fitted.first
    for i, part in enumerate(parts):
        ts, streamed = (first, first_streamed) if i == 0 else streaming.load(run, part.name, settings)
        _same_images(first, ts, part)
        if streamed:
            part.dim, bags = streamed.index.dim, streamed.bags()
        else:
            part.dim = int(ts.features.embedding.shape[1])
            bags = Bags.from_rows(ts.features.embedding, ts.row_image, ts.features.view)
            ts.features = ts.features.subset(np.zeros(len(ts.features), bool))   # let this store's features go
        fitted.fit(bags, part.store_dir.name, lambda h, slug=part.store_dir.name: encoder_fusion.member_name(slug, h),
                   part.name)
        del bags, ts
        gc.collect()


def _fit_concatenated(run: Path, settings: FitSettings, parts: list[EncoderPart], fitted: Members) -> None:
    """Concat mode: the encoders' embeddings side by side (each block scaled), every head fitted once."""
    first = fitted.first
    blocks = []
    for i, part in enumerate(parts):
        ts = first if i == 0 else load_training_set(run, part.name, settings.include_flagged, settings.scale_fusion,
                                                    keep_artifacts=settings.keep_artifacts)
        _same_images(first, ts, part)
        part.dim = int(ts.features.embedding.shape[1])
        part.scaling = encoder_fusion.block_scaling(ts.features.embedding)
        blocks.append(ts.features)
    joined = encoder_fusion.concat_features(blocks, [p.scaling for p in parts])
    del blocks
    bags = Bags.from_rows(joined.embedding, first.row_image, joined.view)
    del joined
    gc.collect()
    fitted.fit(bags, "+".join(p.store_dir.name for p in parts), lambda h: h, ",".join(p.name for p in parts))


def _fit_multi(run: Path, settings: FitSettings, parts: list[EncoderPart], first: TrainingSet,
               first_streamed: streaming.Streamed | None, key: str, started: float) -> FitResult:
    seeds = seeds_of(settings)
    fitted = Members(run, settings, first, seeds, [make_folds(first.y, first.groups, settings.folds, seed)
                                                   for seed in seeds])
    empty = first.features.subset(np.zeros(len(first.features), bool))
    with engines.session(settings):
        if settings.encoder_fusion == "logits":
            _fit_each_encoder(run, settings, parts, fitted, first_streamed)
        else:
            _fit_concatenated(run, settings, parts, fitted)
    first.features = empty
    gc.collect()

    task = classification(first, settings, nll_images=MULTI_NLL_IMAGES)
    results = []
    for s, seed in enumerate(seeds):
        per_fold, final = task.decide(fitted.z[s], first.y, fitted.folds[s])
        cv = CVResult(seed, fitted.names, fitted.folds[s], fitted.z[s], fitted.z_bags[s], fitted.bag_image,
                      per_fold, final, fitted.models if s == 0 else [], fitted.info)
        results.append((cv, task.measure(cv, first.y, settings)))
    metrics, multi = _records(parts, first, settings, key, results, seeds)
    write_outputs(run, first, settings, results[0][0], metrics, key, multi)
    return FitResult.of(run, first, metrics, started)


def _records(parts: list[EncoderPart], first: TrainingSet, settings: FitSettings, key: str,
             results: list[tuple[CVResult, dict]], seeds: list[int]) -> tuple[dict, dict]:
    """(metrics.json, the manifest's multi-encoder fields): members, their encoders and how they were fused."""
    cv, cv_numbers = results[0]
    concat = settings.encoder_fusion == "concat"
    joined_name = ",".join(p.name for p in parts)
    member_rows = []
    for m in cv.heads:
        slug, head = encoder_fusion.split_member(m)
        encoder = joined_name if concat else next(p.name for p in parts if p.store_dir.name == slug)
        member_rows.append({"member": m, "encoder": encoder, "head": head, "weight": cv.final["weights"][m],
                            "oof_macro_f1": cv_numbers["heads"][m]["macro_f1"]})
    encoder_fields = {"encoders": [p.record() for p in parts],
                      "encoder_fusion": {"mode": settings.encoder_fusion,
                                         "rule": encoder_fusion.CONCAT_RULE if concat else encoder_fusion.LOGITS_RULE}}
    metrics = fit_metrics(key, joined_name, first, settings, member_rows, encoder_fields, "member", results, seeds)
    multi = {"encoder": joined_name, "encoder_slug": None, "feature_encoder": None, "feature_key": None,
             "dim": sum(p.dim for p in parts) if concat else None, "encoders": [p.record() for p in parts],
             "encoder_fusion": settings.encoder_fusion,
             "members": {m: dict(zip(("encoder_slug", "head"), encoder_fusion.split_member(m))) for m in cv.heads}}
    return metrics, multi
