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

import struct
import warnings
from pathlib import Path

import cv2
import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from histoembed.core.config import DataSettings
from histoembed.core.errors import UserError
from histoembed.inputs import slides
from histoembed.inputs.exchange import geojson
from histoembed.inputs.layouts import from_manifest, from_reference, submission_ids
from histoembed.inputs.samples import (
    IMAGE_SUFFIXES,
    LABELS_FILE,
    MANIFEST_FILE,
    SPLITS,
    Dataset,
    Problem,
    Sample,
)

# The data folder's vocabulary, importable from here as before the listing moved to layouts.py and samples.py.
__all__ = ["IMAGE_SUFFIXES", "LABELS_FILE", "MANIFEST_FILE", "SPLITS", "Dataset", "Problem", "Sample",
           "load_dataset", "read_image", "read_mask", "read_image_and_mask", "submission_ids"]


# Our own check (``check_pixels``, with a message and an option) replaces PIL's, which only warns.
Image.MAX_IMAGE_PIXELS = None
MAX_PIXELS = DataSettings().max_pixels


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


# TIFF compressions tifffile decodes by itself, losslessly (no imagecodecs): the same bytes PIL gives.
_LOSSLESS_TIFF = {1, 5, 8, 32773, 32946}  # none, LZW, deflate, PackBits, old deflate


def _plain_tiff(path: Path, max_pixels: int | None) -> np.ndarray | None:
    """The first page of an 8-bit RGB or grey TIFF, chunky, losslessly compressed, read by tifffile straight into
    one array (HxWx3 RGB or HxW), else None (PIL then reads it, or says what is wrong, as before).

    PIL holds such an image at 4 bytes a pixel and copies it out at 3: a one-level 20000 x 20000 TIFF read as
    an image peaked at 5.6 GB in `crops`; this read holds the array alone. A page whose tiles or strips run
    past the end of the file (truncated) is left to PIL, which names it. ``max_pixels`` is checked first.
    """
    if path.suffix.lower() not in (".tif", ".tiff"):
        return None
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            grey = page.photometric == tifffile.PHOTOMETRIC.MINISBLACK and page.samplesperpixel == 1
            rgb = page.photometric == tifffile.PHOTOMETRIC.RGB and page.samplesperpixel == 3
            size = path.stat().st_size
            if (page.dtype != np.uint8 or not (grey or rgb) or page.extrasamples or page.bitspersample != 8
                    or page.planarconfig != tifffile.PLANARCONFIG.CONTIG or int(page.compression) not in _LOSSLESS_TIFF
                    or page.is_subsampled or page.fillorder != 1 or not page.databytecounts
                    or any(n == 0 or o + n > size for o, n in zip(page.dataoffsets, page.databytecounts))):
                return None
            check_pixels((page.imagewidth, page.imagelength), path, max_pixels)
            pixels = page.asarray()
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - anything tifffile cannot read plainly goes to PIL, which names the problem
        return None
    want = (page.imagelength, page.imagewidth, 3) if rgb else (page.imagelength, page.imagewidth)
    return np.ascontiguousarray(pixels) if pixels.shape == want else None


def read_image(path: str | Path, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """Any PNG/JPEG/TIFF as HxWx3 uint8 RGB; alpha is composited onto white (slide background).

    Stages pass ``max_pixels=None`` for images ``load_dataset`` already checked with the user's limit.
    """
    path = Path(path)
    plain = _plain_png(path, max_pixels)
    if plain is not None:
        return cv2.cvtColor(plain, cv2.COLOR_GRAY2RGB if plain.ndim == 2 else cv2.COLOR_BGR2RGB)
    tiff = _plain_tiff(path, max_pixels)
    if tiff is not None:
        return tiff if tiff.ndim == 3 else cv2.cvtColor(tiff, cv2.COLOR_GRAY2RGB)
    img = _open(path, max_pixels)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        rgb = np.repeat(_to_uint8(np.asarray(img))[..., None], 3, axis=2)
    elif img.mode in ("RGBA", "LA", "PA", "P", "La", "RGBa"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32)
        alpha = rgba[..., 3:4] / 255.0
        rgb = (rgba[..., :3] * alpha + 255.0 * (1 - alpha)).round().astype(np.uint8)
    else:  # an RGB image as it is: convert() would copy it whole first
        rgb = np.asarray(img if img.mode == "RGB" else img.convert("RGB"))
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
        ds = from_manifest(data)
    elif not data.exists():
        raise UserError("data folder not found", path=data,
                        hint="run in a folder that holds data/, or pass --data DIR")
    elif (data / MANIFEST_FILE).exists():
        ds = from_manifest(data / MANIFEST_FILE)
    elif (data / "train_data").is_dir() or (data / "test_data").is_dir():
        ds = from_reference(data)
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
            problems.append(Problem(e.path or s.image, f"{e.problem}; image skipped", s.label))
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


# Suffixes only whole slides use: such a file that OpenSlide cannot read is an unreadable slide, not an image.


