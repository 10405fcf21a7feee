"""What a data folder holds, once listed: samples (an image or slide, its mask, label, split and patient),
the problems that skipped items, and the dataset they make."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from histoembed.core.errors import UserError


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


LABELS_FILE = "train_labels.csv"


MANIFEST_FILE = "manifest.csv"


SPLITS = ("train", "test")


@dataclass(frozen=True)
class Sample:
    image_id: str          # the sample_index written in labels and submissions (unique within its split)
    split: str             # train / test
    image: Path
    mask: Path | None      # None: no mask (the crops stage then finds tissue by colour)
    label: str | None      # None for test images
    group: str | None = None  # patient (manifest ``group`` column): a patient's images share a fold
    slide: bool = False    # a whole-slide image read through OpenSlide (inputs/slides.py), not a flat image

    @property
    def key(self) -> tuple[str, str]:
        """``(split, image_id)``: what identifies an image (names repeat across splits)."""
        return self.split, self.image_id


@dataclass(frozen=True)
class Problem:
    path: Path
    problem: str
    label: str | None = None  # the label of the training item it skipped (to say why a class has no image)

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


@dataclass
class Dataset:
    root: Path
    samples: list[Sample]
    classes: list[str]                      # every label name given (sorted), spelled as in the labels file
    problems: list[Problem] = field(default_factory=list)  # items skipped, with why
    warnings: list[str] = field(default_factory=list)      # not fatal, worth reading (patients in both splits)

    def split(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.split == name]

    def by_key(self) -> dict[tuple[str, str], Sample]:
        """{(split, image_id): sample}."""
        return {s.key: s for s in self.samples}


def check_keep(ds: Dataset, keep: Sequence[str], data: Path) -> None:
    """Stop when ``--keep`` (qc, crops) names an image that is not a training image."""
    known = {s.image_id for s in ds.split("train")}
    unknown = [k for k in keep if k not in known]
    if unknown:
        raise UserError(f"--keep names image(s) not in the training data: {', '.join(unknown)}", path=data,
                        hint="use training image ids as in train_labels.csv or the manifest, e.g. img_0003.png "
                             "(test images are never left out)")
