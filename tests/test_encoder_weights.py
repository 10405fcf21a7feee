"""No silent wrong answers (issue 23): weights that do not fit the model, or files that do not load, are refused.

A model built with random weights still embeds, so a wrong or damaged file must stop the load with the
file named and what to do. The weights check runs over every registry entry's tiny stand-in (as
tests/test_zoo.py builds them) with one weight removed, one renamed and one of another shape; the
other cases run through the CLI (``histoembed embed`` / ``histoembed encoders``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_embed import write_crops
from test_zoo import tiny_timm, tiny_transformers

from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.encoders import load_encoder

LOADABLE = [e for e in zoo.entries() if not e.refused and e.library != "packaged"]


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, tuple[Path, list[str]]]:
    """{name: (folder, the weight names the file and the model share)} for a tiny stand-in of every entry."""
    root = tmp_path_factory.mktemp("stand-ins")
    out = {}
    for i, entry in enumerate(LOADABLE):
        folder = root / entry.name
        if entry.library == "timm":
            model, config = tiny_timm(entry, seed=i)
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
            head = config["pretrained_cfg"]["classifier"] + "."
        else:
            model = tiny_transformers(entry, seed=i)
            model.save_pretrained(folder, safe_serialization=True)
            head = "pooler."
        in_file = load_file(str(folder / "model.safetensors"))
        own = model.state_dict()
        # Names the file and the model spell alike (transformers renames some on load), classifier left out.
        shared = sorted(k for k in in_file if k in own and in_file[k].ndim >= 2 and not k.startswith(head))
        out[entry.name] = (folder, shared)
    return out


def _edit(folder: Path, dest: Path, change) -> Path:
    shutil.copytree(folder, dest)
    state = load_file(str(dest / "model.safetensors"))
    change(state)
    save_file(state, str(dest / "model.safetensors"))
    return dest


def _remove(key):
    return lambda s: s.pop(key)


def _rename(key):
    return lambda s: s.__setitem__(key + "_renamed", s.pop(key))


def _reshape(key):
    return lambda s: s.__setitem__(key, torch.zeros(s[key].shape[0] + 1, *s[key].shape[1:]))


@pytest.mark.parametrize("entry", LOADABLE, ids=lambda e: e.name)
def test_every_stand_in_loads_untouched_and_refuses_a_removed_renamed_or_reshaped_weight(
        entry, stand_ins, tmp_path, monkeypatch):
    """The one weights rule of both loaders, over every entry the zoo can load."""
    folder, shared = stand_ins[entry.name]
    key = shared[len(shared) // 2]
    monkeypatch.setenv("HISTOEMBED_MODELS", str(tmp_path))
    shutil.copytree(folder, tmp_path / entry.name)
    assert load_encoder(entry.name).encoder_id == str(tmp_path / entry.name)
    shutil.rmtree(tmp_path / entry.name)
    cases = {"removed": (_remove(key), [key], "missing from the file"),
             "renamed": (_rename(key), [key, key + "_renamed"], "the model does not have"),
             "reshaped": (_reshape(key), [key], "of another shape")}
    for case, (change, names, words) in cases.items():
        _edit(folder, tmp_path / entry.name, change)
        with pytest.raises(UserError) as e:
            load_encoder(entry.name)
        msg = str(e.value)
        assert all(n in msg for n in names) and words in msg, (case, msg)
        assert str(tmp_path / entry.name / "model.safetensors") in msg and "hint:" in msg, (case, msg)
        shutil.rmtree(tmp_path / entry.name)


# ---------------------------------------------------------------- through the CLI

def _embed(cli, run: Path, encoder) -> tuple[int, str]:
    write_crops(run, n_train=2, n_test=0, per_image=1)
    r = cli("embed", "--run", run, "--encoder", encoder, "--repeats", 1, "--workers", 0, "--device", "cpu")
    return r.exit_code, r.output


def test_embed_refuses_a_transformers_folder_whose_safetensors_is_not_the_model(tiny_dinov2, tmp_path, cli):
    """Before: transformers printed a LOAD REPORT, initialised every weight at random and embed exited 0."""
    folder = tmp_path / "foo-only"
    shutil.copytree(tiny_dinov2, folder)
    save_file({"foo": torch.zeros(2)}, str(folder / "model.safetensors"))
    code, out = _embed(cli, tmp_path / "run", folder)
    assert code == 2, out
    assert str(folder / "model.safetensors") in out and "random weights" in out
    assert "43 weight(s) of the model missing" in out and "embeddings.cls_token" in out and "(foo)" in out
    assert "hint:" in out and "hf download" in out
    assert not (tmp_path / "run" / "features").exists()


def test_embed_refuses_a_config_whose_sizes_differ_from_the_weights(tiny_dinov2, tmp_path, cli):
    """Before: a RuntimeError traceback suggesting ignore_mismatched_sizes."""
    folder = tmp_path / "wider"
    shutil.copytree(tiny_dinov2, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    code, out = _embed(cli, tmp_path / "run", folder)
    assert code == 2, out
    assert str(folder / "model.safetensors") in out and "of another shape" in out
    assert "embeddings.cls_token: file [1, 1, 32], model [1, 1, 64]" in out
    assert "ignore_mismatched_sizes" not in out and "config.json" in out


@pytest.fixture(scope="module")
def timm_vit(tmp_path_factory) -> Path:
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0).eval()
    folder = tmp_path_factory.mktemp("timm-vit")
    save_for_hf(model, str(folder), safe_serialization=True)
    return folder


@pytest.mark.parametrize("kind", ["transformers", "timm"])
@pytest.mark.parametrize("keep", ["half", "header"])
def test_embed_refuses_a_truncated_safetensors_by_name(kind, keep, tiny_dinov2, timm_vit, tmp_path, cli):
    """Before: SafetensorError (incomplete metadata / invalid header length) as a traceback."""
    folder = tmp_path / "cut"
    shutil.copytree(tiny_dinov2 if kind == "transformers" else timm_vit, folder)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2] if keep == "half" else data[:100])
    code, out = _embed(cli, tmp_path / "run", folder)
    assert code == 2, out
    assert str(folder / "model.safetensors") in out and "damaged or incomplete" in out
    assert "download or copy it again" in out and "Traceback" not in out


def test_the_encoders_command_calls_a_truncated_file_broken(timm_vit, tmp_path, cli, monkeypatch):
    """Before: a folder whose model.safetensors was cut short was listed as usable ('folder')."""
    monkeypatch.setenv("HISTOEMBED_MODELS", str(tmp_path))
    monkeypatch.setenv("COLUMNS", "250")
    folder = tmp_path / "kaiko-vit-b16"
    shutil.copytree(timm_vit, folder)
    rows = {r["name"]: r for r in json.loads(cli("encoders", "--json").output)}
    assert rows["kaiko-vit-b16"]["weights"] == "folder" and rows["kaiko-vit-b16"]["problem"] == ""
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-10])
    rows = {r["name"]: r for r in json.loads(cli("encoders", "--json").output)}
    assert rows["kaiko-vit-b16"]["weights"] == "broken"
    assert str(folder / "model.safetensors") in rows["kaiko-vit-b16"]["problem"]
    r = cli("encoders")
    assert r.exit_code == 0
    line = next(x for x in r.output.splitlines() if x.split()[:1] == ["kaiko-vit-b16"])
    assert line.split()[-1] == "broken"
    assert f"kaiko-vit-b16: weights broken: {folder / 'model.safetensors'} is damaged" in r.output
    assert "download it again" in r.output


@pytest.mark.parametrize("form", ["./absent-model", "models/phikon/v2", "~/absent-histoembed-model", "absolute"])
def test_a_missing_encoder_folder_is_called_a_missing_folder(form, tmp_path, cli):
    """Before: the message spoke of the Hugging Face cache and the hub for a path that is plainly a folder."""
    name = str(tmp_path / "absent") if form == "absolute" else form
    code, out = _embed(cli, tmp_path / "run", name)
    assert code == 2, out
    assert f"the encoder folder {name} does not exist" in out
    assert "Hugging Face cache" not in out and "check the path" in out and "histoembed encoders" in out


def test_a_model_that_asks_for_remote_code_is_refused_without_download_advice(tiny_dinov2, tmp_path, cli):
    """Before: "download it once", as if the weights were missing; the model's own code is what is refused."""
    folder = tmp_path / "custom"
    shutil.copytree(tiny_dinov2, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="hibou", auto_map={"AutoConfig": "configuration_hibou.HibouConfig",
                                                "AutoModel": "modeling_hibou.HibouModel"})
    (folder / "config.json").write_text(json.dumps(config))
    code, out = _embed(cli, tmp_path / "run", folder)
    assert code == 2, out
    assert str(folder / "config.json") in out and "modeling_hibou.py" in out
    assert "never runs code that comes with a model" in out and "download it once" not in out
    assert "registry name" in out and "transformers itself knows" in out
