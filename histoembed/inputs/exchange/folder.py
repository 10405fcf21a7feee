"""Any feature file (TRIDENT, CLAM or STAMP), told apart by what it holds, and a folder of them checked for one
encoder, one dimension and one patch size: a cohort's features are only comparable when all three agree."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from histoembed.core.errors import UserError
from histoembed.inputs.exchange import stamp, trident
from histoembed.inputs.exchange.record import FeatureFile, reading

MPP_TOLERANCE = 0.02  # patches embedded within 2 % of one scale count as one patching (level-0 sides round)


def read_feature_file(path: str | Path, encoder: str | None = None, level0_mpp: float | None = None,
                      with_features: bool = True) -> FeatureFile:
    """One slide's feature file, whichever tool wrote it: ``feats`` is STAMP's, ``features`` TRIDENT's or
    CLAM's. ``encoder`` names the encoder when the file does not; ``level0_mpp`` is the slide's microns per
    pixel (STAMP's micrometres need it). ``with_features=False`` reads everything but the features."""
    path = Path(path)
    with reading(path) as f:
        if stamp.FEATURES in f:
            return stamp.read_stamp(f, path, encoder, level0_mpp, with_features)
        if trident.FEATURES in f:
            return trident.read_trident(f, path, encoder, with_features)
        raise UserError(f"no dataset 'features' (TRIDENT, CLAM) or 'feats' (STAMP); datasets: "
                        f"{', '.join(sorted(f.keys())) or 'none'}", path=path,
                        hint="point at a folder of patch feature files, e.g. TRIDENT's "
                             "20x_256px_0px_overlap/features_<encoder>/")


def feature_files(folder: str | Path) -> list[Path]:
    """The ``.h5`` files directly in ``folder`` (sorted); none there is a UserError that lists the sub-folders
    that hold some (TRIDENT's job folder holds one per patching and encoder)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError("feature folder not found" if not folder.exists() else "not a folder", path=folder)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".h5", ".hdf5") and p.is_file())
    if files:
        return files
    below = sorted({str(p.parent.relative_to(folder)) for p in folder.rglob("*.h5")})
    raise UserError("no .h5 feature file in the folder", path=folder,
                    hint=("the files are in sub-folders; pass one of: " + ", ".join(below[:6])
                          + (" ..." if len(below) > 6 else "")) if below else None)


def read_feature_folder(folder: str | Path, encoder: str | None = None,
                        level0_mpp: Mapping[str, float] | None = None) -> list[FeatureFile]:
    """Every feature file of ``folder`` without its features (read each with ``read_feature_file`` when needed),
    checked to share one encoder, one dimension and one patch size. ``level0_mpp`` maps slide stems to their
    microns per pixel (for STAMP's micrometres)."""
    level0_mpp = level0_mpp or {}
    records = [read_feature_file(p, encoder, level0_mpp.get(p.stem), with_features=False)
               for p in feature_files(folder)]
    check_one_cohort(records, Path(folder))
    return records


def _mixed(records: list[FeatureFile], value, what: str, folder: Path) -> None:
    seen: dict = {}
    for r in records:
        seen.setdefault(value(r), r)
    if len(seen) > 1:
        (a, ra), (b, rb) = list(seen.items())[:2]
        raise UserError(f"the files mix {what}: {ra.path.name} has {a}, {rb.path.name} has {b}"
                        + (f" ({len(seen)} different)" if len(seen) > 2 else ""), path=folder,
                        hint="import one encoder's files of one patching at a time (one folder each)")


def check_one_cohort(records: list[FeatureFile], folder: Path) -> None:
    """Refuse files of several encoders, dimensions or patch sizes (a UserError naming two that differ)."""
    _mixed(records, lambda r: r.encoder_in_file or "(unnamed)", "encoders", folder)
    _mixed(records, lambda r: r.dim, "feature dimensions", folder)
    _mixed(records, lambda r: r.patch_size or "(not said)", "patch sizes in pixels", folder)
    scaled = [r for r in records if r.mpp]
    if len(scaled) not in (0, len(records)):
        _mixed(records, lambda r: "said" if r.mpp else "not said", "files that say their scale and files that do "
                                                                   "not", folder)
    if scaled:
        lo, hi = min(scaled, key=lambda r: r.mpp), max(scaled, key=lambda r: r.mpp)
        if hi.mpp > lo.mpp * (1 + MPP_TOLERANCE):
            raise UserError(f"the files mix patch scales: {lo.path.name} has {lo.describe_patching()}, "
                            f"{hi.path.name} has {hi.describe_patching()}", path=folder,
                            hint="import one patching (one magnification) at a time")
    elif records:
        _mixed(records, lambda r: r.patch_size_level0, "patch sides in level-0 pixels", folder)
