"""The two ways a data folder lists its samples: the reference challenge's layout (``train_data/``,
``test_data/``, ``train_labels.csv``) and a manifest CSV (``image,mask,label,split[,group]``), with the checks
that make a listing trustworthy (label spellings, paths that stay inside the folder, files that are what their
names say). ``dataset.load_dataset`` picks one and checks the samples' pixels."""

from __future__ import annotations

import csv
import os
import unicodedata
from pathlib import Path

from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.samples import IMAGE_SUFFIXES, LABELS_FILE, MANIFEST_FILE, SPLITS, Dataset, Problem, Sample


def submission_ids(data: str | Path) -> list[str]:
    """Every test image id in submission order (folder or manifest order), including images other stages skip."""
    data = Path(data)
    manifest = data if data.suffix.lower() == ".csv" else data / MANIFEST_FILE
    if manifest.is_file():
        return [(row["image"] or "").strip() for _, row in _read_csv(manifest, required=("image", "split"))
                if (row["split"] or "").strip().lower() == "test"]
    folder = data / "test_data"
    if not folder.is_dir():
        raise UserError("no test_data/ folder", path=data,
                        hint="submit predicts the test split; pass the data folder with --data")
    return [p.name for p in _reference_images(folder)]


def _reference_images(folder: Path) -> list[Path]:
    """The ``img_*`` files of a reference-layout folder, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.name.startswith("img_") and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_for(image: Path) -> Path:
    return image.with_name("mask_" + image.name[len("img_"):])


def from_reference(root: Path) -> Dataset:
    problems: list[Problem] = []
    labels = _read_labels(root / LABELS_FILE) if (root / "train_data").is_dir() else {}
    samples: list[Sample] = []
    for split in SPLITS:
        folder = root / f"{split}_data"
        if not folder.is_dir():
            continue
        images = _reference_images(folder)
        seen: dict[str, Path] = {}
        for img in images:
            if img.name in seen:  # cannot happen within a folder; kept for clarity
                raise UserError("duplicate image id", path=img)
            seen[img.name] = img
            _inside_data(root, img)
            mask = _mask_for(img)
            if not mask.exists():
                alt = [m for m in folder.glob(f"mask_{img.stem[len('img_'):]}.*") if m.suffix.lower() in IMAGE_SUFFIXES]
                if alt:
                    mask = alt[0]
                else:
                    problems.append(Problem(img, f"no mask (expected {mask.name} beside it); image skipped",
                                            labels.get(img.name) if split == "train" else None))
                    continue
            _inside_data(root, mask)
            label = None
            if split == "train":
                label = labels.get(img.name)
                if label is None:
                    problems.append(Problem(img, f"training image has no row in {LABELS_FILE}; skipped"))
                    continue
            samples.append(Sample(img.name, split, img, mask, label))
        if split == "train":
            for image_id in sorted(set(labels) - set(seen)):
                problems.append(Problem(root / LABELS_FILE,
                                        f"label row for {image_id!r}, but train_data/{image_id} does not exist; row ignored"))
    return Dataset(root, samples, sorted(set(labels.values())), problems)


def label_form(label: str) -> str:
    """The spelling-blind form of a label: Unicode-normalised, spaces collapsed, case folded."""
    return " ".join(unicodedata.normalize("NFKC", label).split()).casefold()


def check_spellings(labels: list[tuple[str, int]], path: Path) -> None:
    """Stop when two labels differ only by case or spaces: they would silently become two classes."""
    first: dict[str, tuple[str, int]] = {}
    for label, lineno in labels:
        seen = first.setdefault(label_form(label), (label, lineno))
        if seen[0] != label:
            raise UserError(f"labels {seen[0]!r} (line {seen[1]}) and {label!r} (line {lineno}) differ only by "
                            "case or spaces; they would become two classes", path=path,
                            hint="spell each class one way in every row")


def _inside_data(root: Path, path: Path) -> None:
    """A symlink in the reference layout that leads out of the data folder stops the stage."""
    target = path.resolve()
    if not target.is_relative_to(root.resolve()):
        raise UserError(f"is a symlink to {target}, outside the data folder {root}", path=path,
                        hint="copy the file into the data folder, or list it in a manifest next to it")


def _read_labels(path: Path) -> dict[str, str]:
    rows = _read_csv(path, required=("sample_index", "label"))
    check_spellings([((row["label"] or "").strip(), lineno) for lineno, row in rows if (row["label"] or "").strip()],
                    path)
    labels: dict[str, str] = {}
    for lineno, row in rows:
        key, label = (row["sample_index"] or "").strip(), (row["label"] or "").strip()
        if not key or not label:
            raise UserError(f"line {lineno}: empty sample_index or label", path=path)
        if key in labels:
            raise UserError(f"line {lineno}: duplicate id {key!r}", path=path,
                            hint="each image must have exactly one label row")
        labels[key] = label
    return labels


def _read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    if not path.exists():
        raise UserError("file not found", path=path,
                        hint=f"the training labels go in {LABELS_FILE} with header sample_index,label")
    # Refused before reading: the messages below quote the file (its header), which must stay private
    # when a link leads to a file elsewhere, like an image's link does.
    _inside_data(path.parent, path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in required if c not in header]
            if missing:
                raise UserError(f"header is {','.join(header) or '(empty)'}; missing column(s) {', '.join(missing)}",
                                path=path, hint=f"the header must contain {','.join(required)}")
            reader.fieldnames = header
            return [(reader.line_num, row) for row in reader]  # line_num counts blank lines too
    except UnicodeDecodeError:
        raise UserError("not a UTF-8 text CSV", path=path) from None
    except csv.Error as e:
        raise UserError(f"malformed CSV ({e})", path=path) from None


def _inside(root: Path, rel: str, path: Path, lineno: int) -> Path:
    """A manifest path: absolute as the user wrote it (a cohort's slides often live on shared storage), or
    relative to the manifest and staying inside its folder (no ``..`` out of it, no symlink leading out)."""
    if Path(rel).is_absolute():
        return Path(rel).resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        lexical = Path(os.path.normpath(root.resolve() / rel))
        how = (f"is a symlink to {p}, outside" if lexical.is_relative_to(root.resolve()) else "escapes")
        raise UserError(f"line {lineno}: path {rel!r} {how} the data folder {root}", path=path,
                        hint="a relative path stays inside the manifest's folder; for a file elsewhere, write "
                             "its absolute path")
    return p


SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide", ".dcm")


def _not_a_file(image: Path, rel: str, lineno: int) -> str | None:
    """Why the manifest's ``image`` cannot be read as what its name says, or None."""
    what = "slide" if image.suffix.lower() in SLIDE_SUFFIXES else "image"
    if image.is_dir():
        return f"{what} {rel!r} (line {lineno}) is a directory, not a file; skipped"
    if image.stat().st_size == 0:
        return f"{what} {rel!r} (line {lineno}) is empty (0 bytes); skipped"
    if what == "slide" and not slides.is_slide(image):
        try:
            slides.open_slide(image).close()
        except UserError as e:
            return f"{e.problem} (line {lineno}); skipped"
        return f"slide {rel!r} (line {lineno}) is not a format OpenSlide reads as a slide; skipped"
    return None


def from_manifest(path: Path) -> Dataset:
    root = path.parent
    problems: list[Problem] = []
    samples: list[Sample] = []
    seen: dict[Path, int] = {}  # resolved image -> line, so a/../x.png and x.png are one image
    test_labels = 0
    rows = _read_csv(path, required=("image", "mask", "label", "split"))
    given = [((row["label"] or "").strip(), lineno) for lineno, row in rows
             if (row["split"] or "").strip().lower() == "train" and (row["label"] or "").strip()]
    check_spellings(given, path)
    for lineno, row in rows:
        rel = (row["image"] or "").strip()
        if not rel:
            raise UserError(f"line {lineno}: empty image path", path=path)
        image = _inside(root, rel, path, lineno)
        mask_rel = (row["mask"] or "").strip()
        mask = _inside(root, mask_rel, path, lineno) if mask_rel else None
        split = (row["split"] or "").strip().lower()
        label = (row["label"] or "").strip() or None
        if image in seen:
            raise UserError(f"line {lineno}: duplicate image {rel!r} (also on line {seen[image]})", path=path,
                            hint="each image must appear once")
        seen[image] = lineno
        if split not in SPLITS:
            raise UserError(f"line {lineno}: split is {split!r}, expected train or test", path=path)
        lost = label if split == "train" else None  # a skipped training item's label says which class lost it
        if not image.exists():
            problems.append(Problem(image, f"listed on line {lineno} of {path.name} but does not exist; skipped",
                                    lost))
            continue
        if (why := _not_a_file(image, rel, lineno)) is not None:
            problems.append(Problem(image, why, lost))
            continue
        if mask is not None and not mask.exists():
            problems.append(Problem(mask, f"mask of {rel} (line {lineno}) does not exist; image skipped", lost))
            continue
        if split == "train" and label is None:
            problems.append(Problem(image, f"training image has no label (line {lineno}); skipped"))
            continue
        group = (row.get("group") or "").strip() or None
        test_labels += split == "test" and label is not None
        samples.append(Sample(rel, split, image, mask, label if split == "train" else None, group,
                              slides.is_slide(image)))
    notes = [f"{test_labels} test row(s) of {path.name} have a label: test labels are never used (ignored)"
             ] if test_labels else []
    outside = sum(Path((row["image"] or "").strip()).is_absolute() for _, row in rows)
    notes += [f"{outside} image path(s) of {path.name} are absolute, outside its folder: read as written"
              ] if outside else []
    return Dataset(root, samples, sorted({label for label, _ in given}), problems, notes)
