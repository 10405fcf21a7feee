"""How fast can a 2048² H&E-like PNG be decoded? The ceiling of the crops stage (issue 22, item 5).

The crops stage decodes each image and its mask once; what a decoder takes per image bounds the
stage's images/s per core whatever else is made faster. Times OpenCV (what the stage uses),
Pillow, and, where installed, pyspng (libspng) and imagecodecs (libpng with zlib-ng) on the same
bytes in one process, rounds interleaved. Checks every decoder returns the same pixels.

    python benchmarks/bench_decode.py [--side 2048] [--rounds 5]
"""

from __future__ import annotations

import argparse
import importlib
import io
import time

import cv2
import numpy as np
from PIL import Image


def he_like(side: int, seed: int = 0) -> np.ndarray:
    """Smooth pink-purple texture with noise: compresses about as the challenge's PNGs do (a few MB at 2048²)."""
    rng = np.random.default_rng(seed)
    base = cv2.resize(rng.integers(120, 255, (side // 32, side // 32, 3), dtype=np.uint8), (side, side),
                      interpolation=cv2.INTER_CUBIC)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)


def decoders() -> dict:
    """name -> bytes -> RGB uint8 array, for every decoder importable here."""
    out = {
        "opencv": lambda b: cv2.cvtColor(cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED),
                                         cv2.COLOR_BGR2RGB),
        "pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
    }
    try:
        out["pyspng"] = importlib.import_module("pyspng").load
    except ImportError:
        pass
    try:
        codecs = importlib.import_module("imagecodecs")
        out["imagecodecs"] = codecs.png_decode
    except ImportError:
        pass
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rgb = he_like(args.side)
    data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    found = decoders()
    for name, fn in found.items():
        assert np.array_equal(fn(data), rgb), f"{name} decodes other pixels"
    times: dict[str, list[float]] = {n: [] for n in found}
    for _ in range(args.rounds):
        for name, fn in found.items():  # interleaved: load changes hit every decoder alike
            t0 = time.perf_counter()
            fn(data)
            times[name].append(time.perf_counter() - t0)
    print(f"{args.side}² RGB PNG, {len(data) / 1e6:.1f} MB, median of {args.rounds} interleaved rounds")
    ref = float(np.median(times["opencv"]))
    for name, ts in times.items():
        med = float(np.median(ts))
        print(f"  {name:12s} {med * 1000:7.1f} ms   {1 / med:5.1f} images/s   opencv / this {ref / med:4.2f}")


if __name__ == "__main__":
    main()
