"""The feature store as later stages read it: order, duplicates, NaN, stale or partial, corrupt parts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from histoembed.core import feature_store, store
from synthetic_inputs import write_synthetic_features

TOML = """
[fit]
folds = 3
bootstrap = 0
[fit.mlp]
hidden = 16
epochs = 4
patience = 2
[fit.xgb]
n_estimators = 8
pca_dims = 4
early_stopping_rounds = 3
"""


def invoke(*args):
    from typer.testing import CliRunner

    from histoembed.cli import app
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def make_run(root: Path) -> tuple[Path, Path, Path]:
    """(run, config, store folder): 30 training and 4 test images, 2 crops x 2 views, 8-d."""
    run = root / "run"
    store_dir = write_synthetic_features(run, n_images=30, n_classes=3, n_test=4, dim=8, seed=3)
    config = root / "histoembed.toml"
    config.write_text(TOML)
    return run, config, store_dir


def rewrite(store_dir: Path, edit) -> None:
    """Replace the store's parts by ``edit(table)``: one table or a list of tables (one part each)."""
    parts = feature_store.feature_parts(store_dir)
    table = pa.concat_tables(pq.read_table(p) for p in parts)
    meta = store.read_meta(parts[0])
    for p in parts:
        p.unlink()
    out = edit(table)
    for k, t in enumerate(out if isinstance(out, list) else [out]):
        store.write_table(t.replace_schema_metadata(None), store_dir / f"part-s0of1-{k:05d}.parquet", meta=meta)


def data_with_test_names(root: Path) -> Path:
    """A data folder whose test_data/ holds the synthetic run's test images (named from img_0000.png, as the
    training images: submit keys them by split), each a small image with its mask."""
    from PIL import Image

    folder = root / "data" / "test_data"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(folder / f"img_{i:04d}.png")
        Image.fromarray(np.full((16, 16), 255, np.uint8)).save(folder / f"mask_{i:04d}.png")
    return folder.parent


def fit(run: Path, config: Path):
    return invoke("fit", "--run", run, "--config", config)


def test_rows_are_read_in_key_order_so_part_order_changes_nothing(tmp_path):
    run, config, store_dir = make_run(tmp_path / "a")
    assert fit(run, config).exit_code == 0
    reference = json.loads((run / store.METRICS_FILE).read_text())

    run_b, config_b, store_b = make_run(tmp_path / "b")
    rng = np.random.default_rng(0)
    # Rows shuffled over three parts, as a sharded or resumed run leaves them.
    rewrite(store_b, lambda t: [t.take(ix) for ix in np.array_split(rng.permutation(len(t)), 3)])
    assert fit(run_b, config_b).exit_code == 0
    shuffled = json.loads((run_b / store.METRICS_FILE).read_text())
    assert shuffled["heads"] == reference["heads"] and shuffled["final"] == reference["final"]

    f = feature_store.read_features(store_b)
    keys = list(zip(f.split, f.image_id, f.crop_index, f.view))
    assert keys == sorted(keys)


def test_a_float16_store_reads_one_split_in_key_order_and_keeps_float16_when_asked(tmp_path):
    run = tmp_path / "run"
    store_dir = write_synthetic_features(run, n_images=12, n_test=4, crops=2, views=2, dim=8)
    table = pq.read_table(store_dir / "part-00000.parquet")
    emb = store.embedding_matrix(table["embedding"]).astype(np.float16)
    half = table.set_column(table.schema.get_field_index("embedding"), "embedding",
                            pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), 8))
    meta = store.read_meta(store_dir / "part-00000.parquet")
    (store_dir / "part-00000.parquet").unlink()
    rng = np.random.default_rng(1)
    for k, ix in enumerate(np.array_split(rng.permutation(len(half)), 3)):   # shuffled over three parts
        store.write_table(half.take(ix), store_dir / f"part-{k:05d}.parquet", meta=meta)
    everything = feature_store.read_features(store_dir)
    train = feature_store.read_features(store_dir, split="train")
    kept = feature_store.read_features(store_dir, split="train", keep_dtype=True)
    assert set(everything.split) == {"train", "test"} and set(train.split) == {"train"}
    assert everything.embedding.dtype == train.embedding.dtype == np.float32 and kept.embedding.dtype == np.float16
    mine = everything.split == "train"
    np.testing.assert_array_equal(train.embedding, everything.embedding[mine])
    np.testing.assert_array_equal(kept.embedding.astype(np.float32), train.embedding)
    assert list(train.image_id) == list(everything.image_id[mine]) and list(kept.view) == list(train.view)
    keys = list(zip(train.split, train.image_id, train.crop_index, train.view))
    assert keys == sorted(keys)


def test_duplicate_rows_are_refused(tmp_path):
    run, config, store_dir = make_run(tmp_path)
    rewrite(store_dir, lambda t: [t, t.slice(0, 6)])  # embed beside embed --shard 0/2 wrote crops twice
    r = fit(run, config)
    assert r.exit_code == 2 and "6 duplicate feature row(s)" in r.output
    assert "train image img_0000.png, crop 0, view 0" in r.output


def test_a_nan_embedding_is_refused_by_fit_and_submit_naming_the_row(tmp_path):
    run, config, store_dir = make_run(tmp_path)

    def poison(table, row):
        emb = store.embedding_matrix(table["embedding"]).copy()
        emb[row, 3] = np.nan
        col = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        return table.set_column(table.schema.get_field_index("embedding"), "embedding", col)

    rewrite(store_dir, lambda t: poison(t, 4 * 7 + 3))  # image 7, crop 1, view 1
    r = fit(run, config)
    assert r.exit_code == 2 and "NaN or infinity" in r.output
    assert "train image img_0007.png, crop 1, view 1" in r.output
    assert not (run / store.METRICS_FILE).exists()

    run2, config2, store2 = make_run(tmp_path / "b")
    assert fit(run2, config2).exit_code == 0
    rewrite(store2, lambda t: poison(t, 4 * 31))  # the second test image, img_0001.png: crop 0, view 0
    r = invoke("submit", "--run", run2, "--data", data_with_test_names(tmp_path))
    assert r.exit_code == 2 and "test image img_0001.png, crop 0, view 0" in r.output
    assert not (run2 / store.SUBMISSION_FILE).exists()


def test_a_partial_store_is_refused(tmp_path):
    run, config, store_dir = make_run(tmp_path)
    # A killed embed: the last crops' rows never reached a part.
    rewrite(store_dir, lambda t: t.slice(0, 60))
    r = fit(run, config)
    assert r.exit_code == 2 and "partial" in r.output and "histoembed embed" in r.output
    assert "train image img_0015.png, crop 0, view 0" in r.output

    run2, config2, store2 = make_run(tmp_path / "b")
    rewrite(store2, lambda t: t.filter(pa.compute.not_equal(t["view"], 1)))  # a view missing everywhere
    r = fit(run2, config2)
    assert r.exit_code == 2 and "partial" in r.output and "view 1" in r.output


def test_stale_features_are_refused_after_the_crops_change(tmp_path):
    run, config, store_dir = make_run(tmp_path)
    assert fit(run, config).exit_code == 0
    crops = pq.read_table(run / store.CROPS_FILE)
    store.write_table(crops.replace_schema_metadata(None), run / store.CROPS_FILE, meta={"key": "new-crops"})
    r = fit(run, config)  # not "up to date"
    assert r.exit_code == 2 and "other crops" in r.output and "histoembed embed" in r.output
    r = invoke("submit", "--run", run, "--data", data_with_test_names(tmp_path))
    assert r.exit_code == 2 and "other crops" in r.output


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupt_part_is_called_corrupt(tmp_path, damage):
    run, config, store_dir = make_run(tmp_path)
    rewrite(store_dir, lambda t: [t.slice(0, 40), t.slice(40)])
    part = feature_store.feature_parts(store_dir)[1]
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"x" * len(data))
    r = fit(run, config)
    assert r.exit_code == 2 and "corrupt" in r.output and part.name in r.output
    assert "different settings" not in r.output


# ---------------------------------------------------------------- stage keys

def _other_value(cls, name: str):
    """A valid value of setting ``name`` other than its default."""
    default = cls.model_fields[name].default
    if default is None:
        candidates = [True, 1, "other", ("a", "b")]
    elif isinstance(default, bool):
        candidates = [not default]
    elif isinstance(default, str):
        candidates = [a for a in getattr(cls.model_fields[name].annotation, "__args__", ()) if a != default] \
            or [default + "-other"]
    elif isinstance(default, tuple) and not default:   # an empty list of names (e.g. mask_classes)
        candidates = [("Tumor",), ("blur",), (1,)]
    elif isinstance(default, tuple) and isinstance(default[-1], str):
        candidates = [default[:-1] or default + default]
    elif isinstance(default, tuple):
        last = default[-1]
        candidates = [(*default[:-1], last - 1 if isinstance(last, int) else last * 0.9), (*default, last * 2)]
    else:
        candidates = [default + 1, default - 1, default * 0.9, default * 1.1, default / 2, default + 0.5]
    for value in candidates:
        if value == default:  # 0.0 scaled is still the default
            continue
        try:
            cls.model_validate({name: value})
            return value
        except Exception:
            continue
    raise AssertionError(f"no other value for {cls.__name__}.{name}")


def test_each_stage_key_holds_exactly_the_settings_that_change_the_output():
    from pydantic import BaseModel

    from histoembed.core.config import AugmentSettings, CropSettings, EmbedSettings, FitSettings, MLPSettings, \
        QCSettings, XGBSettings, runtime_only

    assert runtime_only(CropSettings) == {"workers", "engine", "ray_address"} and runtime_only(QCSettings) == {"workers"}
    assert runtime_only(EmbedSettings) == {"workers", "batch_size", "device", "rows_per_part", "threads", "compile",
                                           "check_precision", "precision_threshold", "fallback_fp32", "engine",
                                           "ray_address", "ray_actors", "ray_actor_cpus", "stain_target"}
    assert runtime_only(FitSettings) == {"threads", "memory_gb", "engine", "ray_address", "stream"}
    for cls in (CropSettings, QCSettings, EmbedSettings, AugmentSettings, FitSettings, MLPSettings, XGBSettings):
        base = store.stage_key("stage", 1, cls())
        for name, info in cls.model_fields.items():
            if isinstance(info.default, BaseModel):  # nested tables: checked on their own class
                continue
            changed = store.stage_key("stage", 1, cls.model_validate({name: _other_value(cls, name)}))
            assert (changed != base) == (name not in runtime_only(cls)), f"{cls.__name__}.{name}"
    nested = FitSettings(mlp=MLPSettings(hidden=7))
    assert store.stage_key("fit", 1, nested) != store.stage_key("fit", 1, FitSettings())


def test_changing_each_setting_re_runs_exactly_the_stages_it_should(tmp_path, tiny_dinov2):
    from histoembed.stages import crops, embed, fit, qc
    from histoembed.core.config import Settings, override
    from histoembed.tools.synthetic import make_dataset

    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset(data, n_train=16, n_test=2, seed=0, outliers=False, size_range=(96, 128))  # 2+ per class
    base = Settings()
    base.qc = override(base.qc, workers=1)
    base.crops = override(base.crops, size=32, workers=1, k=2)
    base.embed = override(base.embed, encoder=str(tiny_dinov2), repeats=2, workers=0, batch_size=8)
    base.fit = override(base.fit, folds=2, bootstrap=0)
    base.fit.mlp = override(base.fit.mlp, hidden=8, epochs=2, patience=1)
    base.fit.xgb = override(base.fit.xgb, n_estimators=3, pca_dims=4, early_stopping_rounds=2)

    def pipeline(s: Settings) -> list[str]:
        """The stages that did work."""
        ran = []
        if not qc.run_qc(data, run, s.qc, embed=False).skipped:
            ran.append("qc")
        if not crops.run_crops(data, run, s.crops).skipped:
            ran.append("crops")
        if not embed.run_embed(run, s.embed, s.augment).skipped:
            ran.append("embed")
        if not fit.run_fit(run, s.fit).skipped:
            ran.append("fit")
        return ran

    assert pipeline(base) == ["qc", "crops", "embed", "fit"]
    assert pipeline(base) == []
    changes = [("qc", "workers", 2, []), ("crops", "workers", 2, []), ("embed", "batch_size", 3, []),
               ("embed", "workers", 1, []), ("embed", "rows_per_part", 5, []), ("embed", "device", "cpu", []),
               ("embed", "threads", 1, []), ("fit", "threads", 1, []),
               ("crops", "margin", 0.2, ["crops", "embed", "fit"]), ("augment", "hue", 0.1, ["embed", "fit"]),
               ("embed", "seed", 3, ["embed", "fit"]), ("fit", "seed", 3, ["fit"])]
    for table, name, value, expected in changes:
        s = base.model_copy(deep=True)
        setattr(s, table, override(getattr(s, table), **{name: value}))
        assert pipeline(s) == expected, f"{table}.{name}"
        if expected:
            pipeline(base)  # back to the base outputs
    for image in sorted((data / "train_data").glob("img_*.png"))[:3]:
        image.touch()                       # same bytes, newer time: nothing changed
    assert pipeline(base) == []
