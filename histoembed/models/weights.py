"""Whether weight files load and fit their model: the checks every loader runs, and the zoo's weights here.

A model built with random weights still embeds, and its features look like any others; so a weight file cut
short (``check_safetensors``) or one that does not fit the model its config builds (``check_weights``) is
refused by name before anything is embedded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.sources import weight_files


def weights_hash(files: list[Path]) -> str:
    """sha256 of the weight files; a hub cache names each blob by that hash already."""
    parts = []
    for f in files:
        blob = f.resolve()
        if len(blob.name) == 64 and blob.parent.name == "blobs":
            parts.append(blob.name)
            continue
        h = hashlib.sha256()
        with open(blob, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        parts.append(h.hexdigest())
    return parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()


def broken_safetensors(files: list[Path]) -> tuple[Path, str] | None:
    """(file, why) for the first weight file whose header does not parse or whose data is cut short, else None.

    An interrupted download or copy leaves such a file; safetensors then fails deep inside a loader.
    """
    from safetensors import SafetensorError, safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            return f, str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def check_safetensors(files: list[Path]) -> None:
    """Refuse a truncated or damaged weight file by name, before any loader reads it."""
    broken = broken_safetensors(files)
    if broken:
        f, why = broken
        raise UserError(f"the weight file is damaged or incomplete ({why}): an interrupted download or copy "
                        "leaves such a file", path=f,
                        hint="delete it and download or copy it again (`hf download ORG/NAME --local-dir FOLDER`; "
                             "for the Hugging Face cache, delete the file and run `hf download ORG/NAME`)")


def _names(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... {len(keys) - n} more" if len(keys) > n else "")


def check_weights(missing, unexpected, mismatched, files: list[Path], hint: str) -> None:
    """Refuse a load that would leave any weight at its random init: missing, unexpected or mis-shaped keys.

    One rule for every loader. ``mismatched`` holds (name, shape in the file, shape in the model). A model
    built with random weights still embeds, so without this a wrong file gives features that look fine.
    """
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted((str(k), tuple(a), tuple(b)) for k, a, b in mismatched)
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} weight(s) of the model missing from the file ({_names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} weight(s) in the file the model does not have ({_names(unexpected)})")
    if mismatched:
        shapes = [f"{k}: file {list(a)}, model {list(b)}" for k, a, b in mismatched]
        parts.append(f"{len(mismatched)} weight(s) of another shape ({_names(shapes)})")
    where = files[0] if len(files) == 1 else files[0].parent
    raise UserError("these weights do not fit the model its config.json builds, so it would embed with random "
                    "weights: " + "; ".join(parts), path=where, hint=hint)


def weights_available(entry: zoo.Entry) -> str:
    """'folder', 'cache', 'packaged', 'broken' (a weight file that would not load) or '' (not here). No network."""
    if entry.library == "packaged":
        return "packaged"
    where, files = weight_files(entry)
    return "broken" if where and broken_safetensors(files) else where


def encoder_rows(include_refused: bool = False) -> list[dict]:
    """One row per registry entry for ``histoembed encoders``; 'weights' says where they lie here ('' if nowhere),
    'problem' why weights that are here are broken."""
    rows = []
    for e in zoo.entries():
        if e.refused and not include_refused:
            continue
        weights = "" if e.refused else weights_available(e)
        problem = ""
        if weights == "broken":
            f, why = broken_safetensors(weight_files(e)[1])
            problem = (f"{f} is damaged or incomplete ({why}): delete it and download it again "
                       f"(`hf download {e.hub_id}`, with --local-dir for a folder)")
        rows.append({"name": e.name, "hub_id": e.hub_id, "dim": e.dim, "size": e.size, "pool": e.pool,
                     "licence": e.licence, "gated": e.gated, "refused": e.refused, "weights": weights,
                     "problem": problem})
    return rows
