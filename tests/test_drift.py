"""The train-versus-test drift check: its maths against references, and the stage through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histoembed.models import drift as drift_check
from histoembed.stages import drift
from histoembed.tools import synthetic
from synthetic_inputs import write_synthetic_features
from histoembed.core.config import DriftSettings
from histoembed.inputs.pixels import RGB_FROM_HED

SETTINGS = DriftSettings(bootstrap=300)


def _gaussian_splits(shift: float, n: int = 80, dim: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2 * n, dim))
    is_test = np.r_[np.zeros(n, bool), np.ones(n, bool)]
    x[is_test] += shift / np.sqrt(dim)      # along the diagonal: a direction the PCA keeps
    return x, is_test


def test_same_distribution_gives_an_interval_containing_one_half():
    auc, lo, hi = drift_check.two_sample_auc(*_gaussian_splits(0.0), SETTINGS)
    assert lo < 0.5 < hi
    assert abs(auc - 0.5) < 0.15


def test_shifted_test_split_gives_an_interval_above_one_half():
    auc, lo, hi = drift_check.two_sample_auc(*_gaussian_splits(2.0), SETTINGS)
    assert 0.5 < lo < auc < hi
    assert auc > 0.8


def test_stain_densities_recover_a_pure_stain_and_skip_background_and_padding():
    fill = (124, 116, 104)
    od = 0.6 * RGB_FROM_HED[0] + 0.2 * RGB_FROM_HED[1]      # mostly haematoxylin
    pixel = np.clip(np.round(255 * np.exp(-od)), 0, 255).astype(np.uint8)
    rgb = np.tile(pixel, (8, 8, 1))
    h, e = drift_check.stain_densities(rgb, fill)
    assert h == pytest.approx(0.6, abs=0.02) and e == pytest.approx(0.2, abs=0.02)
    padded = rgb.copy()
    padded[:4] = fill                                       # the fill colour is not tissue
    assert drift_check.stain_densities(padded, fill) == pytest.approx((h, e))
    assert drift_check.stain_densities(np.full((8, 8, 3), 250, np.uint8), fill) is None   # white glass
    assert drift_check.stain_densities(np.tile(np.uint8(fill), (8, 8, 1)), fill) is None


def test_standardised_difference_is_cohens_d():
    a, b = np.array([1.0, 2.0, 3.0]), np.array([3.0, 4.0, 5.0])
    assert drift_check.standardised_difference(a, b) == pytest.approx(2.0)   # pooled SD 1
    assert drift_check.standardised_difference(a, a) == 0.0


def test_verdict_words_name_the_stain_when_it_differs():
    shifted, words = drift_check.verdict(0.9, 0.85, 0.95, {"haematoxylin": 1.2, "eosin": 0.1})
    assert shifted and "strongly" in words and "haematoxylin stronger by 1.2 SD" in words and "eosin" not in words
    shifted, words = drift_check.verdict(0.52, 0.45, 0.6, {"haematoxylin": 0.0, "eosin": 0.0})
    assert not shifted and "No detectable difference" in words


def test_drift_on_features_skips_when_up_to_date_and_reruns_when_settings_change(tmp_path):
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=40, n_test=20, seed=2)
    first = drift.run_drift(run, SETTINGS)
    assert first is not None and not first.skipped
    report = json.loads((run / drift_check.DRIFT_FILE).read_text())
    assert report["images"] == {"train": 40, "test": 20}
    assert not report["shifted"]           # the synthetic test images come from the training distribution
    assert drift.run_drift(run, SETTINGS).skipped
    assert not drift.run_drift(run, DriftSettings(bootstrap=300, seed=1)).skipped


def test_too_few_test_images_means_no_check(tmp_path):
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=40, n_test=3)
    result = drift.run_drift(run, SETTINGS)
    assert result.report["auc"] is None and "at least 5 images of each split" in result.finding


# ---------------------------------------------------------------- through the pipeline and the CLI

@pytest.fixture(scope="module", params=["clean", "stain-shifted"])
def embedded(request, tmp_path_factory, pipeline_settings):
    """(run, shifted): 30 training and 30 test images cut and embedded, with `synth`'s planted stain shift or not."""
    from histoembed.tools.demo import run_pipeline
    root = tmp_path_factory.mktemp(request.param)
    data, run = root / "data", root / "run"
    shifted = request.param == "stain-shifted"
    synthetic.make_dataset(data, n_train=30, n_test=30, seed=5, outliers=False, stain_shift=1.0 if shifted else 0.0)
    run_pipeline(data, run, pipeline_settings, stages=("crops", "embed"))
    return run, shifted


def test_drift_flags_a_restained_test_split_and_not_a_clean_one(embedded, cli):
    run, shifted = embedded
    result = cli("drift", "--run", run, "--bootstrap", "500")
    assert result.exit_code == 0, result.output
    report = json.loads((run / drift_check.DRIFT_FILE).read_text())
    lo, hi = report["auc_ci"]
    if shifted:
        assert lo > 0.5 and report["shifted"]
        # the planted test stains: paler haematoxylin, darker eosin than the training images' mix
        assert report["stain_difference"]["haematoxylin"] < -0.5 and report["stain_difference"]["eosin"] > 0.5
        assert "warning:" in result.output and "differ" in result.output
    else:
        assert lo <= 0.5 <= hi and not report["shifted"]
        assert "No detectable difference" in result.output


def test_fit_runs_the_check_and_a_changed_store_makes_drift_json_stale(tmp_path, cli):
    run = tmp_path / "run"
    write_synthetic_features(run, n_images=40, n_test=20, seed=2)
    result = cli("fit", "--run", run, "--folds", "2", "--heads", "logreg", "--bootstrap", "0")
    assert result.exit_code == 0, result.output
    assert "No detectable difference" in result.output and (run / drift_check.DRIFT_FILE).exists()
    assert drift_check.read_drift(run)[0]["images"] == {"train": 40, "test": 20}
    write_synthetic_features(run, n_images=40, n_test=20, seed=3)   # new features, old drift.json
    report, why = drift_check.read_drift(run)
    assert report is None and "other features or crops" in why
