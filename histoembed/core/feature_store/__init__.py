"""The feature store: ``run/features/<encoder-slug>/``, written by ``embed`` (either engine), read by every later stage.

This package owns the store, writing and reading; the engines write through it and the stages read
through it, by this one name (``from histoembed.core import feature_store``). Its contract:

**Rows.** One row per (split, image, crop, view): ``image_id`` and ``split`` (strings; the pair names the
image), ``crop_index`` (int32), ``view`` (int16), ``embedding`` (a fixed-size list of float32, or float16 with
``--store-dtype float16``) and ``crop_hash`` (the digest of the crop's PNG, or of a slide patch's slide, level,
box, size and mpp). Parts are zstd-compressed, the embeddings byte-stream-split. Readers sort the rows by
(split, image, crop, view) whatever the parts' names or order, so a sharded or resumed store reads as a whole
one. Each part holds whole crops (all their views).

**Views.** View 0 is the clean crop, views 1..r-1 are augmented with parameters that depend only on (seed,
image id, crop index, view). Training crops get r views; test crops the same when ``tta`` is on, else view 0
only (``views_of``). Every encoder of a run therefore sees the very same pixels, and their stores line up row
for row (``check_same_rows``).

**Metadata and key.** Every part carries, in its schema metadata under ``histoembed``, a JSON object
(``store_meta``): ``version``, ``schema`` (the file schema, :data:`histoembed.core.store.SCHEMA`), ``key``
(``store_key``: the encoder's weights, pooling, input size and precision, the views and augmentation, and the
stain normalisation's target; never the crops, which are matched one by one by ``crop_hash``), then
``encoder``, ``encoder_id``, ``weights_hash``, ``dim``, ``pool``, ``size``, ``precision``, ``repeats``,
``tta``, ``seed``, ``augment``, ``store_dtype``, ``crops_key``, ``shard``, ``package_version``,
``precision_check`` and ``stain`` (the normaliser, enough to normalise new crops the same way); the Ray
engine adds ``engine`` and ``ray_node``. With stain normalisation, a part's footer also holds
``histoembed_stain``: how many of its crops were normalised and which passed through unchanged
(``stain_summary`` adds them up).

**Parts.** The local engine writes ``part-s{i}of{n}-{seq}.parquet``, one process per shard under the lock
``.lock-s{i}of{n}`` (every shard of a store with the same n): row groups go to a hidden temporary file,
renamed into place when it holds ``rows_per_part`` rows (or the run ends, or is interrupted with Ctrl-C), so a
killed run loses at most the part in flight. The Ray engine writes ``part-ray-<digest of the key and the crops
it holds>.parquet`` whole and atomically, so a retried task rewrites its part, and renames it into place only
while the store's ``.ray-run`` holds its run's id. Readers take every ``part-*.parquet`` alike.

**Resuming.** On the next call (``open_store``) parts of another key (other settings or weights) or without
crop digests are removed, rows of crops that ``crops.parquet`` no longer holds (other pixels, or gone) are
dropped from their part, and the crops still to embed are those no finished part holds: rows of different
settings never mix, and either engine resumes the other's store.

**Refused on reading.** Parts of different keys or of an older file schema, duplicate rows and NaN or
infinite embeddings (``read_features``); a store that lacks a crop view or holds crops of other pixels than
``crops.parquet`` holds now (``check_complete``); stores of several encoders that do not hold the same rows
(``check_same_rows``). Each with a message that names the store and the embed run that mends it.

The code: :mod:`.schema` (columns, metadata, key, views, folder names, the stain note), :mod:`.writer`
(planning, the lock, writing parts), :mod:`.reader` (reading and checking).
"""

from histoembed.core.feature_store.reader import (
    Features,
    check_complete,
    check_same_rows,
    feature_rows,
    find_feature_store,
    read_features,
    sorted_embedding,
    with_scales,
)
from histoembed.core.feature_store.schema import (
    CROP_HASH,
    FEATURE_COLUMNS,
    PART_OPTIONS,
    ROW_KEY,
    RUN_ID_FILE,
    STAIN_NOTE_KEY,
    STORE_VERSION,
    Crop,
    EncoderFacts,
    add_stain_notes,
    encoder_list,
    encoder_slug,
    feature_parts,
    feature_schema,
    part_schema,
    row_name,
    stain_note,
    stain_summary,
    store_key,
    store_meta,
    views_of,
    with_stain_note,
)
from histoembed.core.feature_store.writer import (
    CropIndex,
    PartWriter,
    StorePlan,
    open_store,
    part_rows,
    shard_lock,
    write_part,
)

__all__ = [
    "CROP_HASH", "FEATURE_COLUMNS", "PART_OPTIONS", "ROW_KEY", "RUN_ID_FILE", "STAIN_NOTE_KEY", "STORE_VERSION",
    "Crop", "CropIndex", "EncoderFacts", "Features", "PartWriter", "StorePlan", "add_stain_notes", "check_complete",
    "check_same_rows", "encoder_list", "encoder_slug", "feature_parts", "feature_rows", "feature_schema",
    "find_feature_store", "open_store", "part_rows", "part_schema", "read_features", "row_name", "shard_lock",
    "sorted_embedding", "stain_note", "stain_summary", "store_key", "store_meta", "views_of", "with_scales",
    "with_stain_note", "write_part",
]
