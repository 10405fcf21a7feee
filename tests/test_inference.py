"""Loading the fitted ensemble: damaged model files and fit outputs of two fits are refused with a message;
the crop maps ask what its heads can do."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from histoembed.core import feature_store, store


@pytest.mark.parametrize("name", ["mlp.safetensors", "xgb.ubj"])
def test_a_truncated_model_file_is_a_message_in_submit_and_report(pipeline_run, tmp_path, cli, name):
    data, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    path = store.fold_dir(copy / store.MODELS_DIR, 0) / name
    path.write_bytes(path.read_bytes()[:100])
    r = cli("submit", "--data", data, "--run", copy)
    assert r.exit_code == 2, r.output
    assert "corrupt or changed since `histoembed fit` wrote them" in r.output and f"fold-00/{name}" in r.output
    assert "histoembed fit" in r.output
    r = cli("report", "--data", data, "--run", copy)      # the report says so where the models are drawn
    assert r.exit_code == 0, r.output
    assert "corrupt or changed" in (copy / store.REPORT_FILE).read_text()


def test_models_and_metrics_of_two_fits_are_refused(pipeline_run, tmp_path, cli):
    data, run = pipeline_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = json.loads((copy / store.METRICS_FILE).read_text())
    (copy / store.METRICS_FILE).write_text(json.dumps({**metrics, "key": "another-fit"}))
    for stage in ("submit", "report"):
        r = cli(stage, "--data", data, "--run", copy)
        assert r.exit_code == 2 and "metrics.json and models/ come from different fits" in r.output


def test_crop_maps_ask_what_the_heads_can_do(pipeline_run):
    """The crop maps ask the fitted heads what they can do: this run's MLP scores crops and no head gives
    attention, so a map is each crop's probability of the class its image was called."""
    from histoembed.models.inference import load_ensemble
    from histoembed.models.maps import CropMaps

    _, run = pipeline_run
    ensemble = load_ensemble(run)
    assert ensemble.member_that("scores_crops") == "mlp" and ensemble.member_that("gives_attention") is None
    with pytest.raises(ValueError, match="no head capability"):
        ensemble.member_that("mlp")
    features = feature_store.read_features(feature_store.find_feature_store(run, ensemble.encoder))
    with pytest.raises(ValueError, match="gives_attention"):
        CropMaps(ensemble, features, attention=True)
    maps = CropMaps(ensemble, features)
    key = sorted(maps.images())[0]
    crop_map = maps.of(key)
    crops = features.subset((features.keys() == key) & (features.view == 0))
    np.testing.assert_allclose(crop_map.weight, ensemble.predict_crops(crops)[:, crop_map.called])
    assert crop_map.called == int(ensemble.predict(crops).pred[0]) and 0 < crop_map.prob <= 1
    assert maps.of("train/no-such-image.png") is None
