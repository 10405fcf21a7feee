"""The fitted fold ensemble that submit, predict and report load: inference apart from training.

Every fold's heads predict each (image, view) bag; per fold the heads' image logits (the mean
over views) are fused with the final temperatures and weights, and the fused probabilities
are averaged over folds. The decision (plain argmax or argmax with the class offsets, as the
fit stage chose), the conformal set and the spread of the per-view probabilities come from
the same final parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoembed.core import feature_store, store
from histoembed.core.errors import UserError
from histoembed.inputs import patch_flags
from histoembed.maths import multiscale
from histoembed.maths.metrics import softmax, view_spread
from histoembed.models import encoder_fusion
from histoembed.models.heads import Bags, Head, decisions
from histoembed.models.heads.base import CAPABILITIES
from histoembed.models.heads import get as get_head
from histoembed.models.heads.indexing import first_seen_index


@dataclass
class ImagePredictions:
    image_ids: list[str]      # first-seen order in the features
    splits: list[str]         # each image's split: (split, image_id) identifies it
    probs: np.ndarray         # [images, classes], calibrated, fused, averaged over folds
    pred: np.ndarray          # class index per image: argmax, or argmax with offsets when the run chose them
    sets: np.ndarray          # [images, classes] bool: the conformal prediction set
    view_spread: np.ndarray   # [images]: spread of the per-view fused probabilities

    def keys(self) -> list[tuple[str, str]]:
        return list(zip(self.splits, self.image_ids))


@dataclass
class Ensemble:
    """Every fold's heads with the final decision parameters."""

    classes: list[str]
    encoder: str
    encoder_slug: str
    dim: int
    feature_key: str | None
    heads: list[str]
    models: list[dict[str, Head]]    # per fold: head name -> fitted head
    final: dict                       # decisions parameters chosen on all out-of-fold predictions
    use_offsets: bool
    manifest: dict
    scale_fusion: str = "crops"      # how crops of several scales reach the heads (fit --scale-fusion)
    scales: list[float] | None = None  # the crop scales the heads were fitted on
    encoders: list[dict] | None = None  # fit --encoder A,B: each encoder's slug, dim, feature key (None: one encoder)
    encoder_fusion: str = "logits"   # fit --encoder-fusion: logits (members per encoder) or concat

    @property
    def slugs(self) -> list[str]:
        """The feature-store folder of every encoder the run uses, in the fit's order."""
        return [e["slug"] for e in self.encoders] if self.encoders else [self.encoder_slug]

    def fuse_scales(self, features: feature_store.Features) -> feature_store.Features:
        """``features`` (with their scales, ``feature_store.with_scales``) as the heads were fitted on them."""
        return multiscale.fuse_scales(features, self.scale_fusion, self.scales)

    def _check(self, features: feature_store.Features, part: dict | None = None) -> None:
        """Refuse features of another width, encoder or embedding than the models' (``part``: one encoder's)."""
        want_dim = self.dim if part is None else part["dim"]
        encoder = self.encoder if part is None else part["encoder"]
        dim = features.embedding.shape[1] if features.embedding.ndim == 2 else None
        if dim is not None and len(features) and dim != want_dim:
            raise UserError(f"the features are {dim}-d but the models were fitted on {want_dim}-d features",
                            hint=f"embed with the models' encoder ({encoder}) or re-run `histoembed fit`")
        enc = features.meta.get("encoder")
        fitted_on = self.manifest.get("feature_encoder") if part is None else part.get("feature_encoder")
        if enc is not None and fitted_on is not None and enc != fitted_on:
            raise UserError(f"the features come from encoder {enc!r} but the models were fitted on {fitted_on!r}",
                            hint=f"pass --encoder {encoder}, or re-run `histoembed fit` on these features")
        key = features.meta.get("key")
        feature_key = self.feature_key if part is None else part.get("feature_key")
        if feature_key is not None and key is not None and key != feature_key:
            raise UserError("the models were fitted on other features than the store holds now "
                            "(embedded again with other settings since `histoembed fit`)",
                            hint="run `histoembed fit` again")

    def _bags(self, features: feature_store.Features) -> tuple[list[tuple[str, str]], Bags]:
        """((split, image_id) per image in first-seen order, the bags): names repeat across splits."""
        keys, row_image = first_seen_index(features.keys())
        return [tuple(str(k).split("/", 1)) for k in keys], Bags.from_rows(features.embedding, row_image,
                                                                          features.view)

    def predict(self, features: feature_store.Features | dict[str, feature_store.Features]) -> ImagePredictions:
        """Image probabilities, decisions, sets and view spread (see the module docstring).

        A run fitted on several encoders takes a dict: encoder slug (``slugs``) -> that store's features.
        """
        if self.encoders:
            if not isinstance(features, dict):
                raise UserError(f"this run was fitted on the encoders {self.encoder}: it needs every one's features",
                                hint="read them with histoembed.models.inference.read_run_features")
            return self.predict_encoders(lambda slug: features[slug])
        features = self.fuse_scales(features)
        self._check(features)
        if len(features) == 0:
            return self._empty()
        keys, bags = self._bags(features)
        return self._decide(keys, bags, [{h: fold_models[h].predict(bags) for h in self.heads}
                                         for fold_models in self.models])

    def _empty(self) -> ImagePredictions:
        C = len(self.classes)
        return ImagePredictions([], [], np.zeros((0, C)), np.zeros(0, np.int64), np.zeros((0, C), bool), np.zeros(0))

    def predict_encoders(self, read) -> ImagePredictions:
        """A several-encoder run's predictions; ``read(slug)`` gives one encoder's features.

        In logits mode each encoder's features are read, predicted by its members and let go before
        the next one is read; concat mode reads them all and puts them side by side.
        """
        keys, bags, per_fold, rows = None, None, [{} for _ in self.models], None
        blocks = []
        for part in self.encoders:
            features = self.fuse_scales(read(part["slug"]))
            self._check(features, part)
            these = (features.keys(), features.crop_index, features.view)
            if rows is not None and not all(np.array_equal(a, b) for a, b in zip(rows, these)):
                raise UserError(f"the feature stores of encoders {self.encoder} hold different crops or views",
                                hint=f"run `histoembed embed --encoder {part['encoder']}`")
            rows = these
            if self.encoder_fusion == "concat":
                blocks.append(features)
                continue
            if len(features) == 0:
                return self._empty()
            keys, bags = self._bags(features)
            mine = [m for m in self.heads if self.manifest["members"][m]["encoder_slug"] == part["slug"]]
            for z, fold_models in zip(per_fold, self.models):
                z.update({m: fold_models[m].predict(bags) for m in mine})
            del features
        if self.encoder_fusion == "concat":
            joined = encoder_fusion.concat_features(blocks, [p["scaling"] for p in self.encoders])
            del blocks
            self._check(joined)
            if len(joined) == 0:
                return self._empty()
            keys, bags = self._bags(joined)
            per_fold = [{h: fold_models[h].predict(bags) for h in self.heads} for fold_models in self.models]
        return self._decide(keys, bags, per_fold)

    def _decide(self, keys: list[tuple[str, str]], bags: Bags, per_fold: list[dict[str, np.ndarray]]
                ) -> ImagePredictions:
        """Fuse each fold's member logits per (image, view) bag, average over folds, decide."""
        C = len(self.classes)
        image_ids = [name for _, name in keys]
        probs, view_probs = np.zeros((len(image_ids), C)), np.zeros((bags.n_bags, C))
        for z_bags in per_fold:
            probs += softmax(decisions.fused_logits(self.final, {h: bags.per_image(z) for h, z in z_bags.items()}))
            view_probs += softmax(decisions.fused_logits(self.final, z_bags))
        probs /= len(self.models)
        view_probs /= len(self.models)
        decided = decisions.decide(probs, self.final)
        pred = decided.pred_offsets if self.use_offsets else decided.pred
        return ImagePredictions(image_ids, [split for split, _ in keys], probs, pred, decided.sets,
                                view_spread(view_probs, bags.image, len(image_ids)))

    def member_that(self, can: str) -> str | None:
        """The first member whose head declares ``can`` (``"gives_attention"`` or ``"scores_crops"``, see
        ``heads.base.Head``), None when none does: callers ask what a head can do, never its name."""
        return next(iter(self.members_that(can)), None)

    def members_that(self, can: str) -> list[str]:
        """Every member whose head declares ``can``, in the fit's order."""
        if can not in CAPABILITIES:
            raise ValueError(f"{can!r} is no head capability ({', '.join(CAPABILITIES)})")
        fold_models = self.models[0] if self.models else {}
        return [h for h in self.heads if getattr(fold_models.get(h), can, False)]

    def predict_crops(self, features: feature_store.Features) -> np.ndarray | None:
        """Per feature row (crop-view): calibrated probabilities of the head that scores crops (the MLP), averaged
        over folds (None without such a head, or when the heads read per-scale image means rather than crops)."""
        member = self.member_that("scores_crops")
        if member is None or self.scale_fusion != "crops" or self.encoders:
            return None
        self._check(features)
        probs = np.zeros((len(features), len(self.classes)))
        for fold_models in self.models:
            probs += softmax(fold_models[member].row_logits(features.embedding) / self.final["T"][member])
        return probs / max(1, len(self.models))

    def crop_attention(self, features: feature_store.Features, member: str | None = None) -> np.ndarray | None:
        """Per feature row: the weight of the crop within its (image, view) bag from the head that gives attention
        (attention-MIL; ``member`` names one of several), averaged over folds (None without such a head, or when
        the heads read per-scale image means rather than crops)."""
        member = member or self.member_that("gives_attention")
        if member is None or self.scale_fusion != "crops" or self.encoders:
            return None
        self._check(features)
        _, bags = self._bags(features)
        out = np.zeros(len(features))
        for fold_models in self.models:
            out[bags.source_row] += fold_models[member].attention(bags)
        return out / max(1, len(self.models))


def check_same_crops(run: Path, ensemble: Ensemble) -> None:
    """Refuse models fitted on other training crops than ``crops.parquet`` holds now (re-cut since fit)."""
    fitted_on = ensemble.manifest.get("train_crops")
    if fitted_on is not None and fitted_on != store.train_crops_digest(run):
        raise UserError(f"the training crops in {store.CROPS_FILE} changed since `histoembed fit`", path=Path(run),
                        hint="run `histoembed embed` and `histoembed fit` again")


def check_one_set(run: Path, key: str | None) -> None:
    """Refuse fit outputs from two fits (models/ of one, metrics or calibration of another)."""
    keys = {store.METRICS_FILE: None, store.CALIBRATION_FILE: None}
    for name in keys:
        if (run / name).exists():
            keys[name] = store.read_json(run / name, name).get("key")
    oof = run / store.OOF_FILE
    keys[store.OOF_FILE] = store.read_meta(oof).get("key") if oof.exists() else None
    mixed = [name for name, k in keys.items() if k is not None and k != key]
    if mixed:
        raise UserError(f"{', '.join(mixed)} and models/ come from different fits (was `histoembed fit` "
                        "interrupted?)", path=run, hint="re-run `histoembed fit`")


def load_ensemble(run: Path) -> Ensemble:
    """The fitted models of ``run/models``; a clear error when any file is missing."""
    models = Path(run) / store.MODELS_DIR
    manifest_path = models / store.MODELS_MANIFEST_FILE
    manifest = store.read_json(manifest_path, "fitted-models manifest", hint="run `histoembed fit` first")
    encoders = manifest.get("encoders")
    fusion_mode = manifest.get("encoder_fusion", "logits")
    try:
        folds, final = int(manifest["folds"]), manifest["final"]
        classes, heads = list(manifest["classes"]), list(manifest["heads"])
        dim = int(manifest["dim"]) if not encoders or fusion_mode == "concat" else 0
        final["T"], final["weights"], final["offsets"], final["conformal_threshold"]  # noqa: B018
        if encoders:
            dims = {e["slug"]: int(e["dim"]) for e in encoders}
            where = {h: (manifest["members"][h]["encoder_slug"], manifest["members"][h]["head"]) for h in heads}
            if fusion_mode == "concat":
                [e["scaling"]["mean"] for e in encoders]  # noqa: B018
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the manifest lacks {e}", path=manifest_path,
                        hint="re-run `histoembed fit` (runs fitted by an older version lack it)") from None
    check_one_set(Path(run), manifest.get("key"))
    for k in range(folds):
        folder = store.fold_dir(models, k)
        if not folder.is_dir():
            raise UserError(f"fold {k} of {folds} is missing", path=folder, hint="re-run `histoembed fit`")
    damaged = store.damaged_model_files(models, manifest)
    missing = [name for name in damaged if not (models / name).exists()]
    if missing:
        raise UserError("model file missing", path=models / missing[0], hint="re-run `histoembed fit`")
    if damaged:
        raise UserError(f"model file(s) corrupt or changed since `histoembed fit` wrote them: {', '.join(damaged[:4])}",
                        path=models, hint="re-run `histoembed fit`: it fits them again")
    fitted = []
    for k in range(folds):
        folder = store.fold_dir(models, k)
        try:
            if encoders and fusion_mode == "logits":
                fold_models = {h: get_head(where[h][1]).load(folder / where[h][0]) for h in heads}
            else:
                fold_models = {h: get_head(h).load(folder) for h in heads}
        except UserError:
            raise
        except Exception as e:  # safetensors, XGBoost and JSON each fail their own way on a damaged file
            raise UserError(f"a model file of fold {k} is corrupt ({type(e).__name__}: {e})", path=folder,
                            hint="re-run `histoembed fit`") from None
        for h, head in fold_models.items():
            want = dims[where[h][0]] if encoders and fusion_mode == "logits" else dim
            if head.classes_ != classes or head.input_dim_ != want:
                raise UserError("this fold's models were fitted on other classes or another feature dimension "
                                "than the manifest says", path=folder, hint="re-run `histoembed fit`")
        fitted.append(fold_models)
    return Ensemble(classes, manifest.get("encoder", ""), manifest.get("encoder_slug", ""), dim,
                    manifest.get("feature_key"), heads, fitted, final,
                    manifest.get("submission_uses") == "offsets", manifest, manifest.get("scale_fusion", "crops"),
                    manifest.get("scales"), encoders, fusion_mode)


def kept_artifacts(ensemble: Ensemble) -> tuple[str, ...]:
    """The artifact flags whose slide patches the models were fitted with (fit --keep-artifacts): inference
    leaves out the same patches fit did."""
    return tuple(ensemble.manifest.get("settings", {}).get("keep_artifacts", ()))


def read_run_features(run: Path, ensemble: Ensemble, split: str, tta: bool = True,
                      encoder: str | None = None) -> feature_store.Features | dict[str, feature_store.Features]:
    """``split``'s features of every store the run was fitted on, checked complete and with their crop scales.

    One encoder: its Features (``encoder`` may name another store of the same encoder). Several: a lazy
    dict slug -> Features that reads a store when asked, so logits-mode inference holds one at a time.
    """
    def read(store_dir: Path) -> feature_store.Features:
        features = feature_store.read_features(store_dir, split=split)
        feature_store.check_complete(features, run, split)
        use, _ = patch_flags.usable_rows(features.image_id, features.crop_index, run, split, kept_artifacts(ensemble))
        features = feature_store.with_scales(features if use.all() else features.subset(use), run)
        return features if tta else features.subset(features.view == 0)

    if not ensemble.encoders:
        return read(feature_store.find_feature_store(run, encoder or ensemble.encoder))
    if encoder is not None and feature_store.encoder_slug(encoder) not in ensemble.slugs:
        raise UserError(f"this run was fitted on the encoders {ensemble.encoder}, not {encoder!r}",
                        hint="leave --encoder out: every encoder the run used is read")
    dirs = {e["slug"]: feature_store.find_feature_store(run, e["encoder"]) for e in ensemble.encoders}
    return _LazyStores(dirs, read)


class _LazyStores(dict):
    """slug -> Features, each store read when it is looked up (and not kept)."""

    def __init__(self, dirs: dict[str, Path], read):
        super().__init__()
        self.dirs, self.read = dirs, read

    def __missing__(self, slug: str) -> feature_store.Features:
        return self.read(self.dirs[slug])

    def __bool__(self) -> bool:
        return bool(self.dirs)
