"""Peak memory of `histoembed qc` and `crops` on data holding a decompression bomb.

The bomb is a complete, valid 30000 x 30000 gray PNG of about 0.9 MB (with a mask of the
same size): decoded, it would need 0.9 GB as gray, 2.7 GB as RGB and several times that in
the stages' working arrays. The stages must skip it from its header (limit: `--max-pixels`),
so their peak memory stays that of the normal images. Each stage runs in a fresh process
(one worker, so all its memory is in that process); its peak is VmHWM.

    python benchmarks/bench_bomb.py
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys
from pathlib import Path
from histoembed.stages import crops, qc
from histoembed.core.config import CropSettings, QCSettings
data, run, stage = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
if stage == "qc":
    r = qc.run_qc(data, run, QCSettings(workers=1), embed=False)
else:
    r = crops.run_crops(data, run, CropSettings(workers=1))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"peak_mib": hwm / 1024, "problems": [str(p) for p in r.problems]}))
"""


def run_stage(data: Path, run: Path, stage: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(data), str(run), stage],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=8, help="normal training images beside the bomb")
    ap.add_argument("--side", type=int, default=30_000, help="the bomb's width and height")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # one copy: tests/synthetic_inputs.py
    from synthetic_inputs import write_blank_png

    from histoembed.tools.synthetic import make_dataset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        plain, bombed = root / "plain", root / "bombed"
        make_dataset(plain, n_train=args.images, n_test=0, seed=0, outliers=False)
        make_dataset(bombed, n_train=args.images, n_test=0, seed=0, outliers=False)
        bomb = bombed / "train_data" / f"img_{args.images:04d}.png"
        write_blank_png(bomb, args.side, args.side)
        write_blank_png(bomb.with_name(bomb.name.replace("img_", "mask_")), args.side, args.side)
        labels = bombed / "train_labels.csv"
        labels.write_text(labels.read_text() + f"{bomb.name},Luminal A\n")
        print(f"bomb: {bomb.name}, {args.side}x{args.side}, {bomb.stat().st_size / 1e6:.2f} MB on disk")
        print("| stage | peak RSS, normal images only | peak RSS, with the bomb | bomb skipped |")
        print("|---|---:|---:|---|")
        for stage in ("qc", "crops"):
            base = run_stage(plain, root / f"run-plain-{stage}", stage)
            with_bomb = run_stage(bombed, root / f"run-bombed-{stage}", stage)
            skipped = any(bomb.name in p and "over the limit" in p for p in with_bomb["problems"])
            print(f"| {stage} | {base['peak_mib']:.0f} MiB | {with_bomb['peak_mib']:.0f} MiB | {skipped} |")


if __name__ == "__main__":
    main()
