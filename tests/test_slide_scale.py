"""A slide's scale and the slide path's last holes (issue 28): a stated MPP no scanner writes, --slide-mpp and
--force-slide-mpp, --mpp finer than the slide, slides smaller than a patch, directories and empty files named
as slides, absolute manifest paths, labels on test rows. Every case through the CLI, never a traceback."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from histoembed.core import store
from histoembed.inputs import slides
from histoembed.tools.synthetic import SlideSpec, write_slide
from test_slides import SMALL_FIT, _manifest

FIXTURES = Path(__file__).parent / "data" / "openslide"


@pytest.fixture
def pair(tmp_path) -> Path:
    """Two training slides at 0.25 um/px, two classes."""
    for i, label in enumerate(["benign", "malignant"]):
        write_slide(tmp_path / f"s{i}.svs", SlideSpec(20 + i, 2400, 1800, label))
    return tmp_path


def _side0(run: Path) -> set[int]:
    t = pq.read_table(run / store.CROPS_FILE, columns=["x0", "x1"]).to_pydict()
    return {x1 - x0 for x0, x1 in zip(t["x0"], t["x1"])}


def _out(r) -> str:
    return " ".join(r.output.split())


def test_a_scale_no_scanner_writes_stops_with_the_slide_mpp_hint(pair, cli):
    write_slide(pair / "huge.svs", SlideSpec(7, 2400, 1800, "benign"), mpp=1000)
    shutil.copy(FIXTURES / "boxes.tiff", pair / "boxes.tiff")
    for bad in ("huge.svs", "boxes.tiff"):
        _manifest(pair, [("s0.svs", "", "benign", "train", ""), ("s1.svs", "", "malignant", "train", ""),
                         (bad, "", "", "test", "")])
        r = cli("crops", "--data", "manifest.csv", cwd=pair)
        assert r.exit_code != 0 and bad in _out(r) and "--slide-mpp" in _out(r), r.output
        assert "outside what scanners write" in _out(r) and "Traceback" not in r.output
        assert not (pair / "run" / store.CROPS_FILE).exists()
    assert "72 dpi" in _out(r)  # boxes.tiff: a writer's default resolution, said as such
    r = cli("crops", "--data", "manifest.csv", "--slide-mpp", "0.25", "--size", "64", cwd=pair)
    assert r.exit_code == 0, r.output
    assert _side0(pair / "run") == {128}  # the fallback, not 352.8 um/px


def test_slide_mpp_applies_only_to_slides_that_do_not_say_unless_forced(pair, cli):
    _manifest(pair, [("s0.svs", "", "benign", "train", ""), ("s1.svs", "", "malignant", "train", "")])
    r = cli("crops", "--data", "manifest.csv", "--slide-mpp", "0.5", cwd=pair)
    assert r.exit_code == 0, r.output
    assert _side0(pair / "run") == {448}  # their own 0.25 um/px kept: 224 px at 0.5 is 448 level-0 px
    r = cli("crops", "--data", "manifest.csv", "--slide-mpp", "0.5", "--force-slide-mpp", "--run", "forced", cwd=pair)
    assert r.exit_code == 0, r.output
    assert _side0(pair / "forced") == {224}
    r = cli("crops", "--data", "manifest.csv", "--force-slide-mpp", "--run", "x", cwd=pair)
    assert r.exit_code != 0 and "--slide-mpp" in _out(r)


def test_an_mpp_finer_than_the_slide_is_refused_unless_upsampling_is_allowed(pair, cli):
    _manifest(pair, [("s0.svs", "", "benign", "train", ""), ("s1.svs", "", "malignant", "train", "")])
    r = cli("crops", "--data", "manifest.csv", "--mpp", "0.1", "--strict", cwd=pair)
    assert r.exit_code != 0 and "finer than the slide's own 0.25" in _out(r) and "s0.svs" in _out(r), r.output
    assert "--allow-upsample" in _out(r)
    r = cli("crops", "--data", "manifest.csv", "--mpp", "0.1", "--allow-upsample", "--max-patches", "4", cwd=pair)
    assert r.exit_code == 0, r.output
    assert _side0(pair / "run") == {90}
    r = cli("crops", "--data", "manifest.csv", "--mpp", "0.24", "--max-patches", "4", "--run", "near", cwd=pair)
    assert r.exit_code == 0, r.output  # within the tolerance of a scanner's 0.2527-like scale


def test_small_slides_directories_and_empty_files_are_named_as_slides(pair, cli):
    (pair / "folder.svs").mkdir()
    (pair / "empty.svs").write_bytes(b"")
    shutil.copy(FIXTURES / "small.svs", pair / "small.svs")
    _manifest(pair, [("s0.svs", "", "benign", "train", ""), ("s1.svs", "", "malignant", "train", ""),
                     ("folder.svs", "", "", "test", ""), ("empty.svs", "", "", "test", ""),
                     ("small.svs", "", "", "test", "")])
    r = cli("crops", "--data", "manifest.csv", cwd=pair)
    out = _out(r)
    assert r.exit_code == 0, r.output
    assert "slide 'folder.svs' (line 4) is a directory" in out
    assert "slide 'empty.svs' (line 5) is empty (0 bytes)" in out
    assert "small.svs: the slide is 16x16 level-0 px, smaller than one 224-px patch" in out
    assert "image" not in out.split("folder.svs")[1].split(";")[0]


def test_absolute_paths_are_read_as_written_and_relative_ones_stay_inside(pair, cli, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("shared")
    write_slide(elsewhere / "far.svs", SlideSpec(9, 2400, 1800, "benign"))
    project = pair / "project"
    project.mkdir()
    _manifest(project, [(str(pair / "s0.svs"), "", "benign", "train", ""),
                        (str(pair / "s1.svs"), "", "malignant", "train", ""),
                        (str(elsewhere / "far.svs"), "", "benign", "test", "")])
    r = cli("crops", "--data", "manifest.csv", "--max-patches", "4", cwd=project)
    assert r.exit_code == 0, r.output
    assert "3 image path(s) of manifest.csv are absolute" in _out(r)
    assert "1 test row(s) of manifest.csv have a label" in _out(r)
    _manifest(project, [("../s0.svs", "", "benign", "train", "")])
    r = cli("crops", "--data", "manifest.csv", "--run", "x", cwd=project)
    assert r.exit_code != 0 and "escapes the data folder" in _out(r) and "absolute path" in _out(r)


def test_stated_scale_rules():
    class Fake:
        def __init__(self, props):
            self.properties = props

    assert slides.stated_mpp(Fake({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.26"}))[0] == pytest.approx(0.255)
    for props in ({}, {"openslide.mpp-x": "0", "openslide.mpp-y": "0"}, {"openslide.mpp-x": "nan", "openslide.mpp-y": "1"},
                  {"openslide.mpp-x": "264.58", "openslide.mpp-y": "264.58", "tiff.XResolution": "96",
                   "tiff.ResolutionUnit": "inch"}):
        mpp, why = slides.stated_mpp(Fake(props))
        assert mpp is None and why
    assert "96 dpi" in why
    assert slides.base_mpp(Fake({}), "x.svs", fallback=0.5) == 0.5
    assert slides.base_mpp(Fake({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}), "x.svs", 0.5) == 0.25
    assert slides.base_mpp(Fake({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}), "x.svs", 0.5, True) == 0.5


def test_openslides_own_test_slides_mixed_with_good_ones_go_through_to_submit(tmp_path, cli, tiny_dinov2):
    """OpenSlide's fixtures (tests/data/openslide) beside good slides, listed by absolute path: every bad one named
    (too small, a default 72-dpi scale, undecodable tiles, an unsupported TIFF), every good one through to
    ``submit``, whose rows cover every test slide (the skipped ones with the class prior)."""


    rows = []
    for i, label in enumerate(["benign", "malignant", "benign", "malignant"]):
        write_slide(tmp_path / f"good{i}.svs", SlideSpec(40 + i, 2400, 1800, label))
        rows.append((f"good{i}.svs", "", label, "train", f"p{i}"))
    write_slide(tmp_path / "good4.svs", SlideSpec(44, 2400, 1800, "benign"))
    rows.append(("good4.svs", "", "", "test", "p4"))
    bad = ["small.svs", "boxes.tiff", "boxes_0.dcm", "unreadable.svs", "unopenable.tiff"]
    rows += [(str(FIXTURES / name), "", "", "test", f"q{i}") for i, name in enumerate(bad)]
    _manifest(tmp_path, rows)
    (tmp_path / "histoembed.toml").write_text(SMALL_FIT.format(encoder=tiny_dinov2))
    r = cli("crops", "--data", "manifest.csv", "--slide-mpp", "0.25", "--max-patches", "6", cwd=tmp_path)
    out = _out(r)
    assert r.exit_code == 0, r.output
    assert "smaller than one 224-px patch" in out.split("small.svs")[1]
    assert "boxes.tiff" in out and "boxes_0.dcm" in out and "Traceback" not in out
    assert "unreadable.svs: unreadable or truncated slide" in out
    assert "unopenable.tiff" in out
    for args in (["embed", "--repeats", "1"], ["fit", "--folds", "2", "--heads", "logreg"], ["submit"]):
        r = cli(*args, cwd=tmp_path)
        assert r.exit_code == 0, (args, r.output)
    with (tmp_path / "run" / "submission.csv").open() as f:
        submitted = [row["sample_index"] for row in csv.DictReader(f)]
    assert submitted == [row[0] for row in rows if row[3] == "test"]
