"""The slide path's last holes (issue 28 items 6, 7, 9, 12, 13), each through the CLI: `embed --verify-data`, a
slide that cannot be read while embedding, the causes behind a label left without images, `--max-patches` on a
big one-level TIFF read as an image, and DataLoader workers that end with a killed `embed`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoembed.core import store
from histoembed.tools.synthetic import SlideSpec, tissue_image, write_slide
from test_slides import _manifest

EMBED_TOML = """
[crops]
workers = 1
size = 32
max_patches = 3
[embed]
encoder = "{encoder}"
workers = 0
repeats = 1
"""


def _out(r) -> str:
    return " ".join(r.output.split())


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, tiny_dinov2) -> Path:
    """Two training slides, a training image and a test slide (three patches a slide, 32 px)."""
    root = tmp_path_factory.mktemp("cohort")
    for i, label in enumerate(["benign", "malignant", "benign"]):
        write_slide(root / f"s{i}.svs", SlideSpec(30 + i, 2400, 1800, label))
    Image.fromarray(tissue_image(np.random.default_rng(0), 256, 256, "Luminal A")[0]).save(root / "a.png")
    _manifest(root, [("s0.svs", "", "benign", "train", ""), ("s1.svs", "", "malignant", "train", ""),
                     ("a.png", "", "benign", "train", ""), ("s2.svs", "", "", "test", "")])
    (root / "histoembed.toml").write_text(EMBED_TOML.format(encoder=tiny_dinov2))
    return root


@pytest.fixture
def copy(cohort, tmp_path) -> Path:
    """This test's own copy of the cohort (tests below edit its files)."""
    root = tmp_path / "c"
    shutil.copytree(cohort, root)
    return root


def _crops(cli, root: Path, *options) -> None:
    r = cli("crops", "--data", "manifest.csv", *options, cwd=root)
    assert r.exit_code == 0, r.output


def _rewrite_in_place(path: Path, edit) -> None:
    """Change a file's bytes keeping its size and modification time (what `cp -p` or `rsync -t` of another
    file of the same size leaves): the stamp cache, trusting both, does not see it."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    edit(data)
    with path.open("r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def _zero(data: bytearray) -> None:
    data[:] = bytes(len(data))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_slide_zeroed_in_place_after_crops_is_named_by_embed(copy, cli, workers):
    """Item 7: the reader's problem record survives the DataLoader (with and without workers): the slide is
    named, never `'list' object has no attribute 'to'`."""
    _crops(cli, copy)
    _rewrite_in_place(copy / "s2.svs", _zero)
    r = cli("embed", "--workers", workers, cwd=copy)
    assert r.exit_code != 0 and "s2.svs" in _out(r), r.output
    assert "Traceback" not in r.output and "attribute" not in r.output
    if workers == 0:  # the Ray engine's decode task reads the same records (no cluster needed to call it)
        import pyarrow.parquet as pq

        from histoembed.core.errors import UserError
        from histoembed.engines.ray import _decode

        crops = copy / "run" / store.CROPS_FILE
        t = pq.read_table(crops, columns=["image_id", "split", "crop_index"]).to_pydict()
        rows = np.array([i for i, name in enumerate(t["image_id"]) if name == "s2.svs"])
        with pytest.raises(UserError) as stop:
            _decode({"row": rows, **{k: np.array(v)[rows] for k, v in t.items()}}, str(crops))
        assert Path(stop.value.path).name == "s2.svs"


def test_embed_verify_data_hashes_slides_and_images_again(copy, cli):
    """Item 6: a same-size edit with the modification time restored passes the stamp cache; `embed
    --verify-data` hashes every slide and data file again and names the one that changed."""
    _crops(cli, copy)

    def flip(data: bytearray) -> None:  # a byte near the end: pixels of the last tiles, the file still opens
        data[-100] ^= 0xFF

    _rewrite_in_place(copy / "s1.svs", flip)
    r = cli("embed", "--verify-data", cwd=copy)
    assert r.exit_code != 0 and "s1.svs" in _out(r) and "changed" in _out(r), r.output
    assert not (copy / "run" / store.FEATURES_DIR).exists() or not list((copy / "run" / store.FEATURES_DIR).rglob(
        "part-*.parquet"))
    _crops(cli, copy, "--verify-data")  # cut again from the new bytes (crops trusts the same cache): embed agrees
    r = cli("embed", "--verify-data", cwd=copy)
    assert r.exit_code == 0, r.output
    rgb = np.asarray(Image.open(copy / "a.png")).copy()
    rgb[0, 0] ^= 0xFF
    Image.fromarray(rgb).save(copy / "a.png")
    r = cli("embed", "--verify-data", cwd=copy)
    assert r.exit_code != 0 and "a.png" in _out(r) and "changed" in _out(r), r.output
    assert "Traceback" not in r.output


def test_a_label_left_without_images_lists_the_causes(copy, cli):
    """Item 9: the only 'benign' training slide has a mask of the wrong aspect (said only with --strict before):
    the stop names the mask and its problem, not "the problems listed" with nothing listed."""
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(copy / "square_mask.png")  # the slide is 4:3
    _manifest(copy, [("s0.svs", "square_mask.png", "benign", "train", ""), ("s1.svs", "", "malignant", "train", ""),
                     ("s2.svs", "", "", "test", "")])
    r = cli("crops", "--data", "manifest.csv", cwd=copy)
    out = _out(r)
    assert r.exit_code != 0 and "label 'benign' has no training image left" in out, r.output
    assert "square_mask.png" in out and "aspect" in out and "Traceback" not in r.output
    assert not (copy / "run" / store.CROPS_FILE).exists()


def test_max_patches_caps_a_big_one_level_tiff_read_as_an_image(copy, cli):
    """Item 12: a one-level TIFF is read as an image (no pyramid), through the image crop path: --max-patches
    caps its crops as it caps a slide's patches, and its pixels are those PIL reads (tifffile reads such a plain
    TIFF straight into one array: 3 bytes a pixel, where PIL held 4 and copied out 3 more)."""
    import pyarrow.parquet as pq
    import tifffile

    from histoembed.inputs.dataset import read_image

    rgb = tissue_image(np.random.default_rng(1), 1400, 1200, "Luminal A")[0]
    tifffile.imwrite(copy / "big.tif", rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    assert np.array_equal(read_image(copy / "big.tif"), np.asarray(Image.open(copy / "big.tif").convert("RGB")))
    _manifest(copy, [("s0.svs", "", "benign", "train", ""), ("big.tif", "", "malignant", "train", ""),
                     ("a.png", "", "", "test", "")])
    for strategy in ("grid", "blobs"):
        r = cli("crops", "--data", "manifest.csv", "--strategy", strategy, "--max-patches", 4, "--k", 10,
                "--scales", "1,2", cwd=copy)
        assert r.exit_code == 0, r.output
        t = pq.read_table(copy / "run" / store.CROPS_FILE, columns=["image_id", "scale"]).to_pydict()
        for name in ("big.tif", "a.png", "s0.svs"):
            n = sum(i == name and s == 1 for i, s in zip(t["image_id"], t["scale"]))
            assert 1 <= n <= 4, (strategy, name, n)
        assert sum(i == "big.tif" and s == 1 for i, s in zip(t["image_id"], t["scale"])) == 4, strategy


def _alive_with(text: str) -> list[int]:
    """Pids of live (not zombie) processes whose command line holds ``text``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if text in (proc / "cmdline").read_bytes().decode(errors="replace") and \
                    (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                found.append(int(proc.name))
        except OSError:  # it ended meanwhile
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux's /proc (PR_SET_PDEATHSIG)")
def test_dataloader_workers_end_with_a_killed_embed(copy, cli):
    """Item 13: `embed --workers 2` killed (-9) after its first batch: its DataLoader workers (forked: the same
    command line, naming this run) are gone at once, not when the loader's five-second watchdog looks."""
    import signal
    import subprocess
    import sys
    import time

    from histoembed.engines.base import STOP_AFTER_ENV

    _crops(cli, copy)
    run = copy / "run"
    cmd = [sys.executable, "-m", "histoembed", "embed", "--run", str(run), "--workers", "2", "--batch-size", "2"]
    log = copy / "embed.log"  # a file, not a pipe: reading a pipe to its end would wait for the workers too
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=copy, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "HF_HUB_OFFLINE": "1", STOP_AFTER_ENV: "1:SIGKILL"})
        assert proc.wait(timeout=300) == -signal.SIGKILL, log.read_text()
    # Whether the workers end at once is decided by the kernel's parent-death signal, which the check below
    # reads directly; here they only have to end at all (a generous bound: a busy machine is slow, not wrong).
    deadline = time.monotonic() + 120
    while _alive_with(str(run)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = _alive_with(str(run))
    for pid in left:  # never leave them behind, whatever the result
        os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} DataLoader worker(s) outlived the killed embed"
    code = ("import ctypes, os; from histoembed.engines.batches import end_with_parent; "
            "end_with_parent(os.getppid()); sig = ctypes.c_int(); "
            "ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); print(sig.value)")  # 2: PR_GET_PDEATHSIG
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert int(got) == signal.SIGKILL  # a worker is killed the moment its parent dies, not when a watchdog looks
