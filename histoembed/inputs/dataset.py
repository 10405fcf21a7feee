"""Finding images, masks and labels, and checking them before any work is done.

Two layouts are understood:

* the reference layout: ``train_data/img_XXXX.png`` + ``train_data/mask_XXXX.png``,
  ``test_data/`` likewise, and ``train_labels.csv`` with header ``sample_index,label``;
* a manifest CSV ``image,mask,label,split`` (paths relative to the CSV), passed as
  ``--data path/to/manifest.csv`` or found as ``manifest.csv`` in the data folder.

Problems with single items (a missing mask, a size mismatch, an unlabelled image, ...)
skip that item and are listed as :class:`Problem`; problems that make the whole input
ambiguous (duplicate ids, a path leaving the data folder, a malformed CSV) stop the stage
with a :class:`UserError` before anything is written.

An image is identified by ``(split, image_id)``, never by its name alone: the reference
challenge numbers both ``train_data/`` and ``test_data/`` from ``img_0000.png``. Names are
unique within a split.
"""

from __future__ import annotations

import csv
import os
import struct
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from histoembed.core.config import DataSettings
from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.exchange import geojson

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
LABELS_FILE = "train_labels.csv"
MANIFEST_FILE = "manifest.csv"
SPLITS = ("train", "test")

# Our own check (``check_pixels``, with a message and an option) replaces PIL's, which only warns.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = DataSettings().max_pixels


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


# ---------------------------------------------------------------- reading pixels

def check_pixels(size: tuple[int, int], path: Path, max_pixels: int | None) -> None:
    """Refuse an image whose header promises more pixels than ``max_pixels`` (None: no limit)."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise UserError(f"image is {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                        "(a decompression bomb, or a very large image)", path=path,
                        hint="if the image is real, raise the limit with --max-pixels N "
                             "(or max_pixels in the [data] table of histoembed.toml)")


def _open(path: Path, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    try:
        img = Image.open(path)
        check_pixels(img.size, path, max_pixels)  # from the header, before any pixel is decoded
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # decodes fully: truncated files fail here, not later
        return img
    except FileNotFoundError:
        raise UserError("file not found", path=path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable or truncated image ({e})", path=path,
                        hint="re-export the file, or remove it from the data folder") from None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    if np.issubdtype(a.dtype, np.integer):
        top = 65535 if a.max(initial=0) > 255 else 255
        return (a.astype(np.float32) * (255.0 / top)).round().astype(np.uint8)
    a = a.astype(np.float32)
    if a.max(initial=0) <= 1.0:
        a = a * 255.0
    return np.clip(a, 0, 255).round().astype(np.uint8)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plain_png(path: Path, max_pixels: int | None) -> np.ndarray | None:
    """An 8-bit grey or RGB PNG without transparency decoded by OpenCV (HxW grey or HxWx3 BGR), else None.

    The common case (the reference data's images and masks) decodes about 20 % faster than through PIL,
    into one array with no copy. Any other file, or one OpenCV cannot read whole (truncated, corrupt),
    gives None: PIL then reads it, or says what is wrong, exactly as before. The header's pixel count is
    checked against ``max_pixels`` before any pixel is decoded.
    """
    try:
        data = np.fromfile(path, np.uint8)
    except OSError:
        return None
    head = data[:26].tobytes()
    if len(head) < 26 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR" or head[24] != 8 or head[25] not in (0, 2):
        return None
    width, height = struct.unpack(">II", head[16:24])
    check_pixels((width, height), path, max_pixels)
    pixels = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    channels = 3 if head[25] == 2 else None  # colour type 2: RGB, 0: grey
    if (pixels is None or pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width)
            or (pixels.shape[2] if pixels.ndim == 3 else None) != channels):  # e.g. a tRNS chunk gave alpha
        return None
    return pixels


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Any PNG/JPEG/TIFF as HxWx3 uint8 RGB; alpha is composited onto white (slide background).

    Stages pass ``max_pixels=None`` for images ``load_dataset`` already checked with the user's limit.
    """
    path = Path(path)
    plain = _plain_png(path, max_pixels)
    if plain is not None:
        return cv2.cvtColor(plain, cv2.COLOR_GRAY2RGB if plain.ndim == 2 else cv2.COLOR_BGR2RGB)
    img = _open(path, max_pixels)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        rgb = np.repeat(_to_uint8(np.asarray(img))[..., None], 3, axis=2)
    elif img.mode in ("RGBA", "LA", "PA", "P", "La", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    else:
        rgb = np.asarray(img.convert("RGB"))
    if rgb.ndim != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
        raise UserError(f"image has an unusable shape {rgb.shape}", path=path)
    return np.ascontiguousarray(rgb)


def read_mask(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A mask as HxW uint8 (0..255); colour masks use their brightest channel."""
    path = Path(path)
    plain = _plain_png(path, max_pixels)
    if plain is not None:
        return plain if plain.ndim == 2 else np.ascontiguousarray(plain.max(axis=2))
    img = _open(path, max_pixels)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")
    a = np.asarray(img)
    if a.ndim == 3:
        if a.shape[2] in (2, 4):  # drop alpha
            a = a[..., :-1]
        a = a.max(axis=2)
    return np.ascontiguousarray(_to_uint8(a))


def read_image_and_mask(image: str | Path, mask: str | Path | None,
                        max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """An image as RGB and its mask (None when it has none); a mask of another size is a UserError naming the mask.

    Stages pass ``max_pixels=None`` for images ``load_dataset`` already checked with the user's limit.
    """
    rgb = read_image(image, max_pixels)
    if mask is None:
        return rgb, None
    m = read_mask(mask, max_pixels)
    if m.shape != rgb.shape[:2]:
        raise size_mismatch(Path(mask), (m.shape[1], m.shape[0]), Path(image), (rgb.shape[1], rgb.shape[0]))
    return rgb, m


def size_mismatch(mask: Path, mask_size: tuple[int, int], image: Path, image_size: tuple[int, int]) -> UserError:
    """The one message for a mask whose (width, height) is not its image's."""
    return UserError(f"mask is {mask_size[0]}x{mask_size[1]} but its image {image.name} is "
                     f"{image_size[0]}x{image_size[1]}", path=mask)


def image_size(path: Path, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; more than ``max_pixels`` is refused."""
    try:
        with Image.open(path) as img:
            check_pixels(img.size, path, max_pixels)
            return img.size
    except FileNotFoundError:
        raise UserError("file not found", path=path) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"unreadable image ({e})", path=path,
                        hint="re-export the file, or remove it from the data folder") from None


# ---------------------------------------------------------------- finding samples

def load_dataset(data: str | Path, strict: bool = False, check_sizes: bool = True,
                 max_pixels: int = MAX_PIXELS) -> Dataset:
    """Find and check every sample under ``data``.

    ``strict`` turns item problems into a stop. ``check_sizes`` reads every header to
    compare image and mask sizes and skips images over ``max_pixels`` (cheap: no pixels
    are decoded).
    """
    data = Path(data)
    if data.is_file() and data.suffix.lower() == ".csv":
        ds = _from_manifest(data)
    elif not data.exists():
        raise UserError("data folder not found", path=data,
                        hint="run in a folder that holds data/, or pass --data DIR")
    elif (data / MANIFEST_FILE).exists():
        ds = _from_manifest(data / MANIFEST_FILE)
    elif (data / "train_data").is_dir() or (data / "test_data").is_dir():
        ds = _from_reference(data)
    else:
        raise UserError("no train_data/, test_data/ or manifest.csv found", path=data,
                        hint="use the reference layout or write a manifest CSV (image,mask,label,split)")
    leaks = leakage(ds.samples)  # every listed image, before any is skipped
    if check_sizes:
        ds = _check_sizes(ds, max_pixels)
    ds.warnings += leaks
    if strict and ds.problems:
        listed = "\n  ".join(map(str, ds.problems[:20]))
        raise UserError(f"{len(ds.problems)} problem(s) in the data (--strict):\n  {listed}", path=data)
    if not ds.samples:
        raise UserError("no usable images found", path=data,
                        hint="\n  ".join(map(str, ds.problems[:20])) or None)
    return ds


def _check_sizes(ds: Dataset, max_pixels: int) -> Dataset:
    kept, problems = [], list(ds.problems)
    for s in ds.samples:
        try:
            if s.slide:
                check_slide(s)
                kept.append(s)
                continue
            size = image_size(s.image, max_pixels)
            if s.mask is not None:
                msize = image_size(s.mask, max_pixels)
                if msize != size:
                    raise size_mismatch(s.mask, msize, s.image, size)
        except UserError as e:
            problems.append(Problem(e.path or s.image, f"{e.problem}; image skipped"))
            continue
        kept.append(s)
    return Dataset(ds.root, kept, ds.classes, problems, ds.warnings)


def check_slide(s: Sample) -> None:
    """A slide must open; its mask, an image of the slide's aspect or QuPath GeoJSON on it (UserError naming it)."""
    with slides.open_slide(s.image) as slide:
        size = slide.dimensions
    if s.mask is not None:
        (geojson.check_on_slide(geojson.read_polygons(s.mask), size, s.mask) if geojson.is_geojson(s.mask)
         else slides.check_aspect(image_size(s.mask, None), s.mask, size))


def leakage(samples: list[Sample]) -> list[str]:
    """One warning per patient (``group``) with images in both splits: its test images are not unseen."""
    splits: dict[str, set[str]] = {}
    for s in samples:
        if s.group:
            splits.setdefault(s.group, set()).add(s.split)
    return [f"patient {g!r} has images in both train and test (leakage: the test score is optimistic)"
            for g in sorted(g for g, sp in splits.items() if len(sp) > 1)]


def read_slide_mask(s: Sample, shape: tuple[int, int], classes=None) -> "np.ndarray | None":
    """A slide's mask on a thumbnail ``shape`` as bool (None without one): an image resized, or QuPath GeoJSON
    polygons filled (those of ``classes`` when given), holes excluded."""
    if s.mask is None:
        return None
    with slides.open_slide(s.image) as slide:
        size = slide.dimensions
    return (geojson.geojson_mask(s.mask, size, shape, classes) if geojson.is_geojson(s.mask)
            else slides.mask_on_thumbnail(read_mask(s.mask, None), s.mask, size, shape))


def read_slide_thumbnail(s: Sample, max_side: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
    """A slide's thumbnail (longest side about ``max_side``) and its mask on it as uint8 0/255 (None without one):
    what qc checks for a slide (tissue, ink, blank), read tile by tile, never a whole level."""
    with slides.open_slide(s.image) as slide:
        size = slide.dimensions
        rgb, _ = slides.thumbnail(slide, s.image, 1.0, max(1.0, max(size) / max_side))
    if s.mask is None:
        return rgb, None
    return rgb, read_slide_mask(s, rgb.shape[:2]).astype(np.uint8) * 255


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


def _from_reference(root: Path) -> Dataset:
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
                    problems.append(Problem(img, f"no mask (expected {mask.name} beside it); image skipped"))
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


# Suffixes only whole slides use: such a file that OpenSlide cannot read is an unreadable slide, not an image.
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


def _from_manifest(path: Path) -> Dataset:
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
        if not image.exists():
            problems.append(Problem(image, f"listed on line {lineno} of {path.name} but does not exist; skipped"))
            continue
        if (why := _not_a_file(image, rel, lineno)) is not None:
            problems.append(Problem(image, why))
            continue
        if mask is not None and not mask.exists():
            problems.append(Problem(mask, f"mask of {rel} (line {lineno}) does not exist; image skipped"))
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
