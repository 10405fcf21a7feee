"""Several encoders, one decision: `fit --encoder A,B` over two feature stores of the same crops and views.

The generated features split the class signal between the encoders: with four classes, encoder A
sees only whether an image is of {0, 1} or of {2, 3} (``visible=[0, 0, 1, 1]``), encoder B only
whether it is of {0, 2} or of {1, 3} (``visible=[0, 1, 0, 1]``). Each alone can tell at best half of
the classes apart; together they tell all four, so the fused out-of-fold macro-F1 must beat each
encoder alone, with a paired bootstrap interval (``histoembed compare``) above 0. An encoder that
carries no signal at all must get (nearly) no weight and leave the good encoder's score as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from histoembed.tools import compare
from synthetic_inputs import write_synthetic_features
from histoembed.stages import fit
from histoembed.core import feature_store, store
from histoembed.core.config import ABMILSettings, FitSettings, LogRegSettings, MLPSettings, XGBSettings
from histoembed.core.errors import UserError
from histoembed.models import inference

N_IMAGES = 160


def settings(**kw) -> FitSettings:
    return FitSettings(**{"folds": 4, "bootstrap": 100, "heads": ("logreg", "xgb"),
                          "mlp": MLPSettings(hidden=16, epochs=5, patience=2), "logreg": LogRegSettings(),
                          "xgb": XGBSettings(n_estimators=20, pca_dims=8, early_stopping_rounds=5), **kw})


def two_encoders(root: Path, a: dict, b: dict, n_images: int = N_IMAGES, n_classes: int = 4) -> Path:
    """A run with crops.parquet and two stores of the same crops and views: enc/a (24-d) and enc/b (12-d)."""
    run = root / "run"
    common = {"n_images": n_images, "n_classes": n_classes, "n_test": 6, "crops": 2, "views": 2, "seed": 3}
    write_synthetic_features(run, encoder="enc/a", dim=24, feature_seed=11, **common, **a)
    write_synthetic_features(run, encoder="enc/b", dim=12, feature_seed=12, **common, **b)
    return run


def copies(run: Path, names: list[str]) -> dict[str, Path]:
    """One copy of the run per fit, so each keeps its own oof.parquet for `compare`."""
    out = {}
    for name in names:
        out[name] = run.parent / name
        shutil.copytree(run, out[name])
    return out


@pytest.fixture(scope="module")
def split_signal(tmp_path_factory) -> dict[str, Path]:
    """Runs fitted on enc/a alone, enc/b alone and both (logits fusion), on the same images and folds."""
    run = two_encoders(tmp_path_factory.mktemp("split"), {"visible": [0, 0, 1, 1], "signal": 1.5},
                       {"visible": [0, 1, 0, 1], "signal": 1.5})
    runs = copies(run, ["a", "b", "ab"])
    for name, encoder in (("a", "enc/a"), ("b", "enc/b"), ("ab", "enc/a,enc/b")):
        fit.run_fit(runs[name], settings(), encoder=encoder)
    return runs


def test_encoders_that_carry_different_parts_of_the_signal_fuse_to_a_better_score_than_either(split_signal):
    metrics = {k: json.loads((r / store.METRICS_FILE).read_text()) for k, r in split_signal.items()}
    fused = metrics["ab"]["heads"]["fused"]["macro_f1"]
    assert fused > 0.8, fused                               # all four classes told apart
    for alone in ("a", "b"):
        assert metrics[alone]["heads"]["fused"]["macro_f1"] < 0.7   # half of the signal
        result = compare.run_compare(split_signal[alone], split_signal["ab"], bootstrap=500)
        assert result.same_folds and result.images == N_IMAGES
        assert result.difference > 0.2 and result.interval[0] > 0, (alone, result.as_dict())
    # metrics.json records every (encoder, head) member: its OOF score and final weight
    members = metrics["ab"]["members"]
    assert [(m["encoder"], m["head"]) for m in members] == [("enc/a", "logreg"), ("enc/a", "xgb"),
                                                            ("enc/b", "logreg"), ("enc/b", "xgb")]
    assert abs(sum(m["weight"] for m in members) - 1) < 1e-9
    for m in members:
        assert m["oof_macro_f1"] == metrics["ab"]["heads"][m["member"]]["macro_f1"] < 0.7
    by_encoder = {e: sum(m["weight"] for m in members if m["encoder"] == e) for e in ("enc/a", "enc/b")}
    assert min(by_encoder.values()) > 0.2                   # both encoders are needed
    assert [e["dim"] for e in metrics["ab"]["encoders"]] == [24, 12]
    assert metrics["ab"]["encoder_fusion"]["mode"] == "logits"


def test_a_multi_encoder_fit_keeps_each_encoder_s_models_apart_and_skips_when_nothing_changed(split_signal):
    run = split_signal["ab"]
    manifest = json.loads((run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["heads"] == ["enc--a:logreg", "enc--a:xgb", "enc--b:logreg", "enc--b:xgb"]
    assert {f.split("/")[1] for f in manifest["files"]} == {"enc--a", "enc--b"}
    assert (run / "models" / "fold-03" / "enc--b" / "logreg.json").is_file()
    oof = pq.read_table(run / store.OOF_FILE)
    assert {"logits_enc--a:xgb", "logits_enc--b:logreg"} <= set(oof.column_names)
    again = fit.run_fit(run, settings(), encoder="enc/a,enc/b")
    assert again.skipped
    # the ensemble reads both stores and predicts the test images
    ensemble = inference.load_ensemble(run)
    assert ensemble.slugs == ["enc--a", "enc--b"]
    pred = ensemble.predict(inference.read_run_features(run, ensemble, "test"))
    assert len(pred.image_ids) == 6 and np.allclose(pred.probs.sum(axis=1), 1)
    with pytest.raises(UserError, match="needs every one's features"):
        ensemble.predict(feature_store.read_features(feature_store.find_feature_store(run, "enc/a"), split="test"))


def test_an_encoder_without_signal_gets_nearly_no_weight_and_leaves_the_score_as_it_was(tmp_path):
    run = two_encoders(tmp_path, {"signal": 1.0}, {"signal": 0.0}, n_classes=3)
    runs = copies(run, ["a", "ab"])
    fit.run_fit(runs["a"], settings(), encoder="enc/a")
    result = fit.run_fit(runs["ab"], settings(), encoder="enc/a,enc/b")
    noise = sum(m["weight"] for m in result.metrics["members"] if m["encoder"] == "enc/b")
    assert noise <= 0.1, result.metrics["members"]
    for m in result.metrics["members"]:
        if m["encoder"] == "enc/b":
            assert m["oof_macro_f1"] < 0.5                  # chance is 1/3
    diff = compare.run_compare(runs["a"], runs["ab"], bootstrap=500)
    assert diff.interval[0] <= 0 <= diff.interval[1] or abs(diff.difference) < 0.03, diff.as_dict()
    assert abs(diff.difference) < 0.06, diff.as_dict()


def test_concat_fusion_gives_each_head_both_encoders_side_by_side(tmp_path):
    run = two_encoders(tmp_path, {"visible": [0, 0, 1, 1], "signal": 1.5}, {"visible": [0, 1, 0, 1], "signal": 1.5})
    result = fit.run_fit(run, settings(encoder="enc/a,enc/b", encoder_fusion="concat"))
    assert result.metrics["heads"]["fused"]["macro_f1"] > 0.8
    assert [m["member"] for m in result.metrics["members"]] == ["logreg", "xgb"]
    manifest = json.loads((run / store.MODELS_DIR / store.MODELS_MANIFEST_FILE).read_text())
    assert manifest["dim"] == 36 and manifest["encoder_fusion"] == "concat"
    assert [len(e["scaling"]["mean"]) for e in manifest["encoders"]] == [24, 12]
    info = json.loads((run / "models" / "fold-00" / "logreg.json").read_text())
    assert info["input_dim"] == 36
    ensemble = inference.load_ensemble(run)
    pred = ensemble.predict(inference.read_run_features(run, ensemble, "test"))
    assert pred.probs.shape == (6, 4)


def test_stores_of_other_rows_are_refused_naming_the_store_the_count_and_what_to_run(tmp_path):
    run = two_encoders(tmp_path, {}, {}, n_images=30, n_classes=3)
    part = feature_store.feature_parts(run / "features" / "enc--b")[0]
    table = pq.read_table(part)
    keep = [not (i == "img_0007.png" and s == "train" and v == 1) for i, s, v in
            zip(table["image_id"].to_pylist(), table["split"].to_pylist(), table["view"].to_pylist())]
    meta = table.schema.metadata
    pq.write_table(table.filter(keep).replace_schema_metadata(meta), part)
    with pytest.raises(UserError) as e:
        fit.run_fit(run, settings(folds=3), encoder="enc/a,enc/b")
    message = str(e.value)
    assert "'enc/b' lacks 2 of the" in message and "train image img_0007.png, crop 0, view 1" in message
    assert "histoembed embed --encoder enc/b" in message and "enc--b" in message


def test_each_encoder_s_bags_streamed_give_the_in_memory_fit(tmp_path, monkeypatch):
    """Stores too big for memory are streamed one encoder at a time (issue 37): the same members' OOF logits."""
    from histoembed.core.feature_store import bags as slides

    run = two_encoders(tmp_path, {}, {}, n_images=30, n_classes=3)
    streamed = copies(run, ["streamed"])["streamed"]
    quick = {"folds": 3, "heads": ("logreg", "abmil"), "bootstrap": 0, "abmil": ABMILSettings(epochs=2)}
    fit.run_fit(run, settings(**quick, stream="never"), encoder="enc/a,enc/b")
    read, real = [], slides.SlideReader.read
    monkeypatch.setattr(slides.SlideReader, "read", lambda self, i: read.append((self.index.store_dir.name, i))
                        or real(self, i))
    fit.run_fit(streamed, settings(**quick, stream="always"), encoder="enc/a,enc/b")
    assert {store_dir for store_dir, _ in read} == {"enc--a", "enc--b"}
    assert pq.read_table(run / store.OOF_FILE).equals(pq.read_table(streamed / store.OOF_FILE))
    manifests = [json.loads((r / "models" / "manifest.json").read_text()) for r in (run, streamed)]
    assert manifests[0]["encoders"] == manifests[1]["encoders"] and manifests[0]["key"] == manifests[1]["key"]


def test_encoder_list_from_the_settings_file_and_a_name_given_twice(tmp_path):
    run = two_encoders(tmp_path, {}, {}, n_images=30, n_classes=3)
    with pytest.raises(UserError, match="share the same store"):
        fit.run_fit(run, settings(folds=3), encoder="enc/a,enc--a")
    with pytest.raises(UserError, match="no feature store for encoder 'enc/c'"):
        fit.run_fit(run, settings(folds=3), encoder="enc/a,enc/c")
    result = fit.run_fit(run, settings(folds=3, encoder="enc/a, enc/b"))   # encoder = "enc/a, enc/b" in [fit]
    assert [e["encoder"] for e in result.metrics["encoders"]] == ["enc/a", "enc/b"]


# ---------------------------------------------------------------- the whole chain through the CLI

@pytest.fixture(scope="module")
def two_tiny_dinov2(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny Dinov2 checkpoints of different widths (32-d and 48-d), saved like real ones."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    out = []
    for width in (32, 48):
        torch.manual_seed(width)
        config = Dinov2Config(hidden_size=width, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                              image_size=32, patch_size=16)
        path = tmp_path_factory.mktemp(f"tiny-dinov2-{width}")
        Dinov2Model(config).eval().save_pretrained(path, safe_serialization=True)
        out.append(path)
    return out[0], out[1]


CHAIN_TOML = """\
[crops]
size = 48
workers = 1

[embed]
workers = 0
batch_size = 64

[fit]
folds = 3
bootstrap = 50
heads = ["mlp", "logreg"]

[fit.mlp]
hidden = 16
epochs = 3
patience = 2
"""


@pytest.mark.slow
def test_embed_fit_submit_predict_report_and_compare_with_two_encoders_through_the_cli(tmp_path, cli,
                                                                                       two_tiny_dinov2):
    from histoembed.tools.synthetic import make_dataset

    narrow, wide = two_tiny_dinov2
    data, run = tmp_path / "data", tmp_path / "run"
    make_dataset(data, n_train=24, n_test=4, seed=1, outliers=False)
    config = tmp_path / "histoembed.toml"
    config.write_text(CHAIN_TOML)
    common = ["--run", run, "--config", config]

    def ok(*args):
        r = cli(*args)
        assert r.exit_code == 0, r.output
        return r.output

    ok("crops", "--data", data, *common)
    ok("embed", "--encoder", narrow, "--encoder", wide, "--repeats", "2", *common)
    single = tmp_path / "single"
    shutil.copytree(run, single)
    out = ok("fit", "--encoder", f"{narrow},{wide}", *common)
    assert "Encoders (logits fusion)" in out and "fused" in out
    metrics = json.loads((run / store.METRICS_FILE).read_text())
    assert [e["dim"] for e in metrics["encoders"]] == [32, 48]
    assert [(m["encoder"], m["head"]) for m in metrics["members"]] == [
        (str(narrow), "mlp"), (str(narrow), "logreg"), (str(wide), "mlp"), (str(wide), "logreg")]
    assert "up to date" in ok("fit", "--encoder", f"{narrow},{wide}", *common)

    ok("submit", "--run", run)
    rows = (run / store.SUBMISSION_FILE).read_text().splitlines()
    assert rows[0] == "sample_index,label" and len(rows) == 5
    out = ok("predict", "img_0001.png", "--out", tmp_path / "pred.csv", *common)   # the test image of that name
    assert "Predictions" in out
    predicted = (tmp_path / "pred.csv").read_text().splitlines()[1].split(",")[1]
    assert predicted == rows[2].split(",")[1]             # predict embeds with both encoders, as submit's store did
    ok("report", "--run", run)
    html = (run / store.REPORT_FILE).read_text()
    assert "<h3>Encoders</h3>" in html and f"{narrow} (32-d)" in html and f"{wide} (48-d)" in html
    # a one-encoder run of the same images compares with the two-encoder one
    ok("fit", "--run", single, "--config", config, "--encoder", str(wide))
    out = ok("compare", single, run)
    assert "macro-F1" in out

    # stores of other rows stop the fit with the store, the count and what to run
    shutil.rmtree(run / "features" / feature_store.encoder_slug(str(wide)))
    ok("embed", "--encoder", wide, "--repeats", "1", *common)
    r = cli("fit", "--encoder", f"{narrow},{wide}", *common)
    assert r.exit_code == 2 and f"histoembed embed --encoder {wide}" in r.output and "lacks" in r.output
