"""Where an encoder's files lie: a local folder, the Hugging Face cache, or the hub.

A model's files are read from a folder when the name is one, else through the Hugging Face cache
(``cached_file``, which honours offline mode). Before a loader asks the hub for a model, ``hub_source``
settles in seconds whether the hub can be reached: huggingface_hub retries a failed connection for most of a
minute before transformers gives up, so an offline machine would otherwise wait that long for the message
that says how to get the weights.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from histoembed.core.errors import UserError
from histoembed.models import zoo

MODELS_ENV = "HISTOEMBED_MODELS"  # a folder with one subfolder of weights per registry name
PROBE_TIMEOUT_S = 3.0             # how long the hub has to answer one request before it counts as out of reach


def hf_file(model_id: str, filename: str) -> Path | None:
    """A file of a local folder or of a cached hub model, or None when it has none."""
    folder = Path(model_id)
    if folder.is_dir():
        path = folder / filename
        return path if path.exists() else None
    from transformers.utils import cached_file
    try:
        found = cached_file(model_id, filename, _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except OSError:
        return None
    return Path(found) if found else None


def read_json(path: Path) -> dict:
    """A JSON object from a model's file, or a UserError naming the file."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise UserError(f"{Path(path).name} is not valid JSON", path=path,
                        hint="download the model's files again") from None
    return value if isinstance(value, dict) else {}


def shard_names(index: Path) -> list[str]:
    """The weight files a ``model.safetensors.index.json`` splits the model into."""
    return sorted(set(read_json(index).get("weight_map", {}).values()))


def safetensors_files(model_id: str) -> list[Path]:
    single = hf_file(model_id, "model.safetensors")
    if single:
        return [single]
    index = hf_file(model_id, "model.safetensors.index.json")
    if index:
        return [f for f in (hf_file(model_id, s) for s in shard_names(index)) if f]
    return []


def not_found(model_id: str, why: str) -> UserError:
    from huggingface_hub import constants
    where = (f"the folder {model_id}" if Path(model_id).exists()
             else f"the Hugging Face cache {constants.HF_HUB_CACHE}"
             + (" (offline mode is on)" if constants.HF_HUB_OFFLINE else " and the hub")
             + (f"; there is no folder {model_id} here either" if "/" in model_id else ""))
    return UserError(
        f"cannot load encoder {model_id!r}: {why} (looked in {where})",
        hint="download it once where there is internet (`hf download owkin/phikon-v2 --local-dir phikon-v2`) "
             "and pass the folder: --encoder ./phikon-v2; or use --encoder efficientnet-lite0, which ships with "
             "the package")


def models_dir() -> Path | None:
    """The folder named by $HISTOEMBED_MODELS, whose subfolder <name> holds a registry entry's weights."""
    value = os.environ.get(MODELS_ENV)
    return Path(value) if value else None


def entry_source(entry: zoo.Entry) -> str:
    """Where an entry's weights are read from: its folder under $HISTOEMBED_MODELS if there is one, else its hub id."""
    base = models_dir()
    if base is not None and (base / entry.name / "config.json").exists():
        return str(base / entry.name)
    return entry.hub_id


# ---------------------------------------------------------------- the Hugging Face cache and hub

def cached_snapshot(repo_id: str) -> Path | None:
    """The cache's folder of a hub model when its config.json and all its safetensors weights lie there, else
    None (also for a name that is no hub id). No network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError:
        return None
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    if (folder / "model.safetensors").exists():
        return folder
    index = folder / "model.safetensors.index.json"
    shards = shard_names(index) if index.exists() else []
    return folder if shards and all((folder / s).exists() for s in shards) else None


def weight_files(entry: zoo.Entry) -> tuple[str, list[Path]]:
    """('folder' or 'cache', the entry's weight files) when all of them lie here, else ('', []). No network."""
    source = entry_source(entry)
    if Path(source).is_dir():
        files = safetensors_files(source)
        return ("folder", files) if files else ("", [])
    snapshot = cached_snapshot(entry.hub_id)
    return ("cache", safetensors_files(str(snapshot))) if snapshot else ("", [])


def hub_answers(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint answers one HTTP request (any status) within ``timeout`` seconds.

    One request without retries; it runs in a thread so that a name lookup that hangs is cut short too.
    """
    from huggingface_hub import constants, get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout)
            answered.append(True)
        except Exception:  # noqa: BLE001 - whatever the failure, the hub did not answer
            answered.append(False)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return bool(answered and answered[0])


def hub_source(repo_id: str) -> str:
    """What to load a hub model from: its id when the hub answers (the loader fetches or refreshes it), its
    cached folder when offline mode is on or the hub is out of reach, and when it is in neither place the
    UserError that says how to get it, at once rather than after the hub client's retries."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return repo_id  # no hub id: the loader names the problem
    snapshot = cached_snapshot(repo_id)
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise not_found(repo_id, "it is not in the cache, or only in part")
        return str(snapshot)
    if hub_answers():
        return repo_id
    if snapshot is not None:
        return str(snapshot)
    raise not_found(repo_id, f"it is not in the cache, and the hub ({constants.ENDPOINT}) cannot be reached "
                             f"(no answer within {PROBE_TIMEOUT_S:g} s: no internet here?)")
