"""Where a run's data came from and whether it is still the same: the stamps ``qc`` and ``crops`` record, and
the check every later stage makes before it trusts ``run/crops.parquet`` (a run describes these bytes, no others).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from histoembed.core import store
from histoembed.core.errors import UserError
from histoembed.inputs.dataset import Dataset, Sample, load_dataset

SAMPLE_STAMPS = "sample_stamps"  # metadata: [split, image_id, image sha256, mask sha256] of every sample checked
CROPS_SUMMARY_KEY = "histoembed_summary"  # crops.parquet footer: what `crops` skipped and why (JSON)


def crops_summary(path: str | Path) -> dict:
    """What ``crops`` recorded in its file's footer: ``problems`` ([path, why] of every item it skipped),
    ``left_out`` (training images QC flagged), ``fallbacks`` and ``repaired``; {} when absent or unreadable."""
    try:
        raw = (pq.ParquetFile(path).metadata.metadata or {}).get(CROPS_SUMMARY_KEY.encode())
    except (OSError, pa.ArrowInvalid):
        return {}
    return json.loads(raw) if raw else {}


def checked_stamps(samples: Sequence[Sample], stamp: store.ContentStamps) -> list[list]:
    """What QC checked, by content: later stages compare it with the data they read (a flag is only
    as good as the bytes it was computed from)."""
    return [[s.split, s.image_id, stamp(s.image), stamp(s.mask)] for s in samples]


def changed_since(qc_meta: dict, samples: Sequence[tuple[str, str, str | None, str | None]]) -> list[str] | None:
    """``split/image_id`` of each sample whose image or mask bytes differ from what QC checked, or that QC never
    saw; None when ``qc_meta`` does not record what it checked (a table written by hand or an older histoembed).

    ``samples``: (split, image_id, image sha256, mask sha256), as :func:`checked_stamps` gives them.
    """
    checked = qc_meta.get(SAMPLE_STAMPS)
    if checked is None:
        return None
    seen = {(split, image_id): (image, mask) for split, image_id, image, mask in checked}
    return [f"{split}/{image_id}" for split, image_id, image, mask in samples
            if seen.get((split, image_id)) != (image, mask)]


def sample_stamps(ds: Dataset, stamp: store.ContentStamps) -> list[list]:
    """One [split, image_id, label, image content, mask content] per sample, in the dataset's order."""
    return [[s.split, s.image_id, s.label, stamp(s.image), stamp(s.mask)] for s in ds.samples]


def data_stamp(ds: Dataset, stamp: store.ContentStamps | None = None) -> str:
    """A key of every image, mask and label of ``ds`` by content, wherever the folder is: it changes when a
    file is added, removed or edited (a ``touch`` or a copy changes nothing)."""
    return store.config_key("data", sample_stamps(ds, stamp or store.ContentStamps()))


class DataChanged(UserError):
    """The data's files changed since the crops were cut: every stage after crops must stop, not only note it."""


def run_data(run: Path, data: Path | None = None, verify: bool = False) -> tuple[Path, Dataset]:
    """(data path, dataset) of the data ``run/crops.parquet`` was cut from (``data`` overrides the recorded path).

    Later stages (submit, predict, report) use it so a user who passed ``--data`` to ``crops`` is not
    asked again; they stop (:class:`DataChanged`) when the files changed since the crops were cut, since
    the crops, features and models would then describe other images. Files keep their cached stamps while
    their size and modification time are unchanged; ``verify`` hashes every file again.
    """
    run = Path(run)
    path = run / store.CROPS_FILE
    if not path.exists():
        raise UserError("crops file not found", path=path, hint="run `histoembed crops` first")
    meta = store.check_schema(path, "crops")
    if data is None:
        if not meta.get("data"):
            raise UserError("the crops file does not say which data folder it was cut from", path=path,
                            hint="pass --data, or re-run `histoembed crops`")
        data = Path(meta["data"])
        if not data.exists():
            raise UserError(f"the data the crops were cut from is gone: {data}", path=path,
                            hint="pass --data with its new place, or re-run `histoembed crops --data DIR`")
    ds = load_dataset(data)
    recorded = meta.get("data_stamp")
    cache = meta.get("content_stamps") or {}
    try:
        same = recorded is None or recorded == data_stamp(ds, store.ContentStamps(None if verify else cache))
    except OSError:
        same = False  # a file that cannot be read any more: named below
    if not same:
        changes = changed_files(ds, cache)
        named = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
        raise DataChanged(f"the data under {data} changed since `histoembed crops` cut {path.name}: "
                          f"{named or 'a label or the list of images changed'}", path=data,
                          hint="put the files back as they were, or re-run `histoembed crops` and the stages "
                               "after it")
    return data, ds


def changed_files(ds: Dataset, recorded: dict[str, list]) -> list[str]:
    """In words, each image, mask or slide that differs from what ``crops`` stamped (``recorded``: its
    ``content_stamps``): gone, unreadable, new, or edited."""
    out = []
    listed = {str(Path(f).resolve()) for s in ds.samples for f in (s.image, s.mask) if f is not None}
    for name in sorted(set(recorded) - listed):
        out.append(f"{name} is gone (deleted or moved)" if not Path(name).exists() else f"{name} is no longer listed")
    stamp = store.ContentStamps()
    for name in sorted(listed):
        try:
            digest = stamp(name)
        except OSError as e:
            out.append(f"{name} cannot be read ({e.strerror or e})")
            continue
        if name not in recorded:
            out.append(f"{name} is new")
        elif recorded[name][2] != digest:
            out.append(f"{name} was edited (its bytes differ)")
    return out


def slide_keys(run: Path) -> frozenset[str]:
    """``split/image_id`` of every whole slide ``run/crops.parquet`` has patches of (empty when it has none, or
    there is no crops file): later stages count these as slides, and their crops as patches."""
    path = Path(run) / store.CROPS_FILE
    if not path.exists() or not store.read_meta(path).get("slides"):
        return frozenset()
    t = pq.read_table(path, columns=["image_id", "split", "level"]).to_pydict()
    return frozenset(f"{sp}/{i}" for i, sp, level in zip(t["image_id"], t["split"], t["level"]) if level is not None)


def run_kinds(run: Path, keys: Sequence[str] | None = None) -> tuple[int, int]:
    """(flat images, whole slides) among ``keys`` (``split/image_id``), or among everything ``run/crops.parquet``
    was cut from: which words the console uses for the run's items ((0, 0) without a crops file).

    A key without patches in the crops file (a slide with no tissue, say) counts as a slide only when the run
    has no flat images at all.
    """
    path = Path(run) / store.CROPS_FILE
    meta = store.read_meta(path) if path.exists() else {}
    slides = int(meta.get("slides") or 0)
    images = int(meta.get("images") or 0) - slides
    if keys is None:
        return images, slides
    if not slides or not images:
        return (0, len(keys)) if slides else (len(keys), 0)
    known = slide_keys(run)
    n = sum(k in known for k in keys)
    return len(keys) - n, n
