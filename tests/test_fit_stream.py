"""`fit` on bags streamed from the store slide by slide (issue 37): the same numbers as in memory, the
test split never read, a bounded budget, and the store's checks slide by slide."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from synthetic_inputs import flag_patches, write_synthetic_features
from histoembed.core import feature_store, store
from histoembed.core.config import ABMILSettings, FitSettings, MLPSettings, XGBSettings
from histoembed.core.errors import UserError
from histoembed.core.feature_store import bags as slides
from histoembed.stages import fit

HEADS = ("xgb", "logreg", "abmil", "mlp")


def settings(**kw) -> FitSettings:
    return FitSettings(**{"folds": 3, "bootstrap": 0, "heads": HEADS, "mlp": MLPSettings(hidden=16, epochs=3),
                          "xgb": XGBSettings(n_estimators=8, pca_dims=4), "abmil": ABMILSettings(epochs=3), **kw})


def shuffled_store(root: Path) -> Path:
    """A run whose store is 3 parts of slides in no order, in row groups of 5 rows (slides straddle them)."""
    run = root / "run"
    write_synthetic_features(run, n_images=30, n_classes=3, crops=3, n_test=4)
    store_dir = feature_store.find_feature_store(run, None)
    (part,) = feature_store.feature_parts(store_dir)
    table = pq.read_table(part)
    part.unlink()
    rows = np.random.default_rng(1).permutation(table.num_rows)
    for i, chunk in enumerate(np.array_split(rows, 3)):
        pq.write_table(table.take(pa.array(np.sort(chunk)[::-1].copy())), store_dir / f"part-x{i}.parquet",
                       row_group_size=5, **feature_store.PART_OPTIONS)
    return run


def test_streamed_fit_equals_the_in_memory_fit_and_never_reads_the_test_split(tmp_path, monkeypatch):
    run = shuffled_store(tmp_path)
    other = tmp_path / "streamed"
    shutil.copytree(run, other)
    fit.run_fit(run, settings(stream="never"))
    # The streamed copy's test rows are NaN: fit refuses non-finite rows it reads, so it reads none of them.
    for part in feature_store.feature_parts(feature_store.find_feature_store(other, None)):
        t = pq.read_table(part)
        test = pa.compute.equal(t["split"], "test").to_numpy(zero_copy_only=False)
        emb = np.array(t["embedding"].to_pylist(), np.float32)
        emb[test] = np.nan
        t = t.set_column(t.schema.get_field_index("embedding"), "embedding",
                         pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1]))
        pq.write_table(t, part, row_group_size=5, **feature_store.PART_OPTIONS)
    read = []
    real = slides.SlideReader.read
    monkeypatch.setattr(slides.SlideReader, "read", lambda self, i: read.append(i) or real(self, i))
    fit.run_fit(other, settings(stream="always"))
    assert len(set(read)) == 30
    a, b = pq.read_table(run / "oof.parquet"), pq.read_table(other / "oof.parquet")
    assert a.equals(b)        # every head's OOF logits, bit for bit
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run, other))
    assert ma["heads"] == mb["heads"] and ma["key"] == mb["key"]
    # A re-run of either kind is up to date: streaming changes no output.
    assert fit.run_fit(other, settings(stream="never")).skipped


def test_flagged_patches_are_left_out_of_streamed_bags_as_in_memory(tmp_path):
    run = shuffled_store(tmp_path)
    a, b = "img_0000.png", "img_0001.png"   # one patch of a is blurred; every patch of b is inked: b keeps them all
    flag_patches(run, {(a, 0): ["blur"]}, whole={b: ["ink"]})
    other = tmp_path / "streamed"
    shutil.copytree(run, other)
    heads = ("xgb", "abmil")
    fit.run_fit(run, settings(heads=heads, stream="never"))
    fit.run_fit(other, settings(heads=heads, stream="always"))
    assert pq.read_table(run / "oof.parquet").equals(pq.read_table(other / "oof.parquet"))
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (run, other))
    assert ma["artifacts_left_out"] == mb["artifacts_left_out"]
    assert mb["artifacts_left_out"]["per_slide"] == {a: 1} and mb["artifacts_left_out"]["kept_whole"] == [b]
    # Keeping blur leaves nothing out: another fit, and other numbers than with the patch left out.
    fit.run_fit(other, settings(heads=heads, stream="always", keep_artifacts=("blur",)))
    assert json.loads((other / "metrics.json").read_text())["artifacts_left_out"]["patches"] == 0
    assert not pq.read_table(run / "oof.parquet").equals(pq.read_table(other / "oof.parquet"))


def test_a_small_budget_streams_through_small_caches_and_refuses_what_cannot_fit(tmp_path):
    run = shuffled_store(tmp_path)
    other = tmp_path / "streamed"
    shutil.copytree(run, other)
    heads = ("xgb", "logreg", "abmil")
    fit.run_fit(run, settings(heads=heads, stream="never"))
    # 4 kB: a slide (3 crops x 2 views x 16-d) fits, the store does not, so auto streams, re-reading bags.
    fit.run_fit(other, settings(heads=heads, memory_gb=4e-6))
    assert pq.read_table(run / "oof.parquet").equals(pq.read_table(other / "oof.parquet"))
    # A fold's rows do not fit either: the MLP draws its minibatches from runs of bags, each read once an epoch.
    fit.run_fit(other, settings(heads=("mlp", "xgb"), memory_gb=4e-6))
    logits = np.array(pq.read_table(other / "oof.parquet")["logits_mlp"].to_pylist(), float)
    assert logits.shape == (30, 3) and np.isfinite(logits).all()
    with pytest.raises(UserError, match=r"training slide img_\d+\.png's bag alone holds 6 rows"):
        fit.run_fit(other, settings(heads=heads, memory_gb=1e-6, bootstrap=5))


def test_streamed_fit_refuses_partial_duplicated_or_stale_slides(tmp_path):
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=30, n_classes=3, crops=3)
    (part,) = feature_store.feature_parts(feature_store.find_feature_store(run, None))
    table = pq.read_table(part)
    first = table["image_id"][0].as_py()
    one = pa.compute.and_(pa.compute.equal(table["image_id"], first), pa.compute.equal(table["crop_index"], 0))
    view1 = pa.compute.and_(one, pa.compute.equal(table["view"], 1))

    def fit_with(t: pa.Table):
        pq.write_table(t, part, **feature_store.PART_OPTIONS)
        fit.run_fit(run, settings(heads=("xgb",), stream="always"))

    with pytest.raises(UserError, match=f"train image {first}, view 1, are not the 3 crop"):
        fit_with(table.filter(pa.compute.invert(view1)))
    with pytest.raises(UserError, match="duplicate feature row"):
        fit_with(pa.concat_tables([table, table.filter(view1)]))
    pq.write_table(table, part, **feature_store.PART_OPTIONS)
    crops = run / store.CROPS_FILE    # this store records no crop digests: the crops file's key stands for them
    store.write_table(pq.read_table(crops), crops, meta={**store.read_meta(crops), "key": "other crops"})
    with pytest.raises(UserError, match="embedded from other crops"):
        fit.run_fit(run, settings(heads=("xgb",), stream="always"))


def test_drift_s_image_means_slide_by_slide_equal_those_of_the_whole_store(tmp_path):
    from histoembed.models import drift

    run = shuffled_store(tmp_path)
    store_dir = feature_store.find_feature_store(run, None)
    keys, means = drift.image_means(feature_store.read_features(store_dir))
    streamed_keys, streamed, meta = slides.image_means(store_dir)
    assert list(keys) == list(streamed_keys) and meta["encoder"]
    np.testing.assert_array_equal(means, streamed)
