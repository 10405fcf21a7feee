"""The encoder zoo: every registry entry loads offline from a Hugging Face cache by its name.

For each entry a tiny random model of the same construction (same architecture, layer
types, register tokens, LayerScale) is saved in the hub's cache layout under the entry's
hub id; one subprocess (the cache location is read when huggingface_hub is imported) loads
every entry by name with HF_HUB_OFFLINE=1, and its features must equal a direct timm or
transformers forward with the entry's preprocessing and pooling rule. The loop runs over
``zoo.entries()``, so a new entry cannot skip it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.loaders import pool_tokens, timm_features

SIDE = 32
# The network's size, shrunk; everything else (layer types, registers, LayerScale) stays the entry's.
TINY_VIT = {"img_size": SIDE, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
TINY_RESNET = {"layers": [1, 1, 1, 1]}


def _layer_classes(args: dict) -> dict:
    import timm.layers
    classes = {"SwiGLUPacked": timm.layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
    return {k: classes.get(v, v) if isinstance(v, str) else v for k, v in args.items()}


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights far from their init (LayerScale 1e-5 would make every block a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("norm.weight") else 0.0))
    return model.eval()


def tiny_timm(entry: zoo.Entry, seed: int) -> tuple[torch.nn.Module, dict]:
    """(model, config.json) of a tiny stand-in for a timm entry, built as the loader will build it."""
    import timm

    shape = TINY_RESNET if entry.architecture.startswith("resnet") else {**entry.shape_args, **TINY_VIT}
    num_classes = 5  # a classifier head the loader must drop
    cfg = {"input_size": [3, SIDE, SIDE], "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3],
           "num_classes": num_classes, "classifier": "fc" if entry.architecture.startswith("resnet") else "head"}
    model = timm.create_model(entry.architecture, pretrained=False, num_classes=num_classes,
                              **{**shape, **_layer_classes(entry.model_args)})
    config = {"architecture": entry.architecture, "num_classes": num_classes, "model_args": shape,
              "pretrained_cfg": cfg}
    return _randomise(model, seed), config


def tiny_transformers(entry: zoo.Entry, seed: int) -> torch.nn.Module:
    from transformers import Dinov2Config, Dinov2Model, ViTConfig, ViTModel

    torch.manual_seed(seed)
    if entry.architecture == "ViTModel":
        model = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                   image_size=SIDE, patch_size=16), add_pooling_layer=False)
    elif entry.architecture == "Dinov2Model":
        model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                                         image_size=SIDE, patch_size=16))
    else:
        raise AssertionError(f"no tiny stand-in for transformers architecture {entry.architecture!r}")
    return _randomise(model, seed)


def _safetensors_bytes(model: torch.nn.Module) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in model.state_dict().items()})


def _prefix_tokens(entry: zoo.Entry) -> int:
    """Class token plus registers, counted from the entry's own arguments (not from the model)."""
    args = {**entry.shape_args, **entry.model_args}
    return 1 + args.get("reg_tokens", 4 if "_reg4_" in entry.architecture else 0)


def direct_features(entry: zoo.Entry, model: torch.nn.Module, x01: torch.Tensor, mean, std) -> torch.Tensor:
    """What the entry's model card computes: normalise, forward, then CLS / CLS + mean of patches / average."""
    x = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        if entry.library == "transformers":
            tokens, prefix = model(pixel_values=x).last_hidden_state, 1
        else:
            out = model.forward_features(x)
            if out.ndim == 4:
                return out.mean(dim=(2, 3))
            tokens, prefix = out, _prefix_tokens(entry)
    cls = tokens[:, 0]
    return cls if entry.pool == "cls" else torch.cat([cls, tokens[:, prefix:].mean(1)], dim=1)


@pytest.fixture(scope="module")
def zoo_cache(tmp_path_factory, hub_layout):
    """A Hugging Face cache holding a tiny stand-in for every loadable entry; {name: (entry, model, mean, std)}."""
    cache = tmp_path_factory.mktemp("hub")
    stand_ins = {}
    for i, entry in enumerate(zoo.entries()):
        if entry.refused or entry.library == "packaged":
            continue
        if entry.library == "timm":
            model, config = tiny_timm(entry, seed=i)
            files = {"config.json": json.dumps(config).encode(), "model.safetensors": _safetensors_bytes(model)}
            cfg = config["pretrained_cfg"]
            mean, std = (entry.norm if entry.norm else (cfg["mean"], cfg["std"]))
        elif entry.library == "transformers":
            model = tiny_transformers(entry, seed=i)
            folder = tmp_path_factory.mktemp(entry.name)
            model.save_pretrained(folder, safe_serialization=True)
            files = {f.name: f.read_bytes() for f in folder.iterdir()}
            mean, std = entry.norm
        else:
            raise AssertionError(f"entry {entry.name} has a library with no test stand-in: {entry.library}")
        hub_layout(cache, entry.hub_id, files)
        stand_ins[entry.name] = (entry, model, mean, std)
    return cache, stand_ins


# The commands one after another in one child process (the cache location is read when huggingface_hub is
# imported, so the cache needs a process of its own, but not one per command): each command's exit code and
# output, and after each `submit` the submission it wrote, as one JSON line.
COMMANDS_IN_ONE_PROCESS = """
import json, sys
from pathlib import Path
from typer.testing import CliRunner
from histoembed.cli import app
done = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    submission = Path("run/submission.csv")
    done.append({"args": args, "code": r.exit_code, "output": r.output, "stdout": r.stdout,
                 "submission": submission.read_text() if args[0] == "submit" and submission.exists() else None})
    if r.exit_code:
        break
print(json.dumps(done))
"""


LOAD_ALL = """
import json, sys, torch
from histoembed.models.encoders import load_encoder
x = torch.rand(3, 3, {side}, {side}, generator=torch.Generator().manual_seed(7))
out = {{}}
for name in sys.argv[1:]:
    e = load_encoder(name)
    out[name] = dict(dim=e.dim, size=e.size, pool=e.pool, mean=e.mean, std=e.std, id=e.encoder_id,
                     features=e(x).tolist())
print(json.dumps(out))
"""


def in_one_process(cache, commands: list[list[str]], cwd=None) -> list[dict]:
    """``histoembed`` commands run one after another in one child process whose HF_HUB_CACHE is ``cache``."""
    done = subprocess.run([sys.executable, "-c", COMMANDS_IN_ONE_PROCESS, json.dumps(commands)], cwd=cwd,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "COLUMNS": "250"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    for r in results:
        assert r["code"] == 0, f"histoembed {' '.join(r['args'])}:\n{r['output']}"
    assert [r["args"] for r in results] == commands
    return results


@pytest.fixture(scope="module")
def loaded_from_the_cache(zoo_cache) -> tuple[dict, str]:
    """(every loadable entry's features and settings, `histoembed encoders`' table), both from one child process
    whose cache holds the stand-ins (one process: each costs seconds of imports)."""
    cache, _ = zoo_cache
    loadable = [e.name for e in zoo.entries() if not e.refused and e.library != "packaged"]
    code = LOAD_ALL.format(side=SIDE).replace("sys.argv[1:]", repr(loadable)) + \
        COMMANDS_IN_ONE_PROCESS.replace("print(json.dumps(done))", "print(json.dumps([out, done]))")
    done = subprocess.run([sys.executable, "-c", code, json.dumps([["encoders"]])], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
                                            "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr[-3000:]
    loaded, [listed] = json.loads(done.stdout.strip().splitlines()[-1])
    assert listed["code"] == 0, listed["output"]
    return loaded, listed["stdout"]


def test_every_entry_loads_offline_by_name_and_matches_a_direct_forward(zoo_cache, loaded_from_the_cache):
    cache, stand_ins = zoo_cache
    loadable = [e.name for e in zoo.entries() if not e.refused and e.library != "packaged"]
    assert sorted(stand_ins) == sorted(loadable)
    got, _ = loaded_from_the_cache
    assert sorted(got) == sorted(loadable)
    x = torch.rand(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(7))
    for name, (entry, model, mean, std) in stand_ins.items():
        row = got[name]
        expected = direct_features(entry, model, x, mean, std)
        assert row["pool"] == entry.pool, name
        assert row["id"] == entry.hub_id, name
        assert row["dim"] == expected.shape[1], name
        assert row["size"] == SIDE, name
        assert row["mean"] == pytest.approx(mean) and row["std"] == pytest.approx(std), name
        torch.testing.assert_close(torch.tensor(row["features"]), expected, atol=1e-4, rtol=0, msg=name)


def test_the_encoders_command_says_which_weights_are_in_the_cache(zoo_cache, loaded_from_the_cache):
    _, stand_ins = zoo_cache
    lines = {line.split()[0]: line for line in loaded_from_the_cache[1].splitlines() if line.strip()}
    for name in stand_ins:
        assert lines[name].split()[-1] == "cache", lines[name]
    assert lines["efficientnet-lite0"].split()[-1] == "packaged"
    assert lines["uni2-h"].split()[:5] == ["uni2-h", "MahmoodLab/UNI2-h", "1536", "224", "cls"]
    assert "cc-by-nc-nd-4.0" in lines["uni2-h"] and lines["uni2-h"].split()[-2] == "yes"
    assert "hibou-l" not in lines   # refused entries only with --all


def test_the_encoders_command_on_an_empty_cache_lists_nothing_here(tmp_path):
    as_json, table = in_one_process(tmp_path, [["encoders", "--all", "--json"], ["encoders", "--all"]])
    rows = {r["name"]: r for r in json.loads(as_json["stdout"])}
    assert sorted(rows) == sorted(e.name for e in zoo.entries())
    assert rows["virchow2"]["weights"] == "" and rows["virchow2"]["dim"] == 2560 and rows["virchow2"]["gated"]
    assert rows["efficientnet-lite0"]["weights"] == "packaged"
    assert "trust_remote_code" in rows["hibou-l"]["refused"]
    assert "hibou-l is refused: its model class is code on the hub" in table["stdout"]


@pytest.mark.parametrize("entry", [e for e in zoo.entries() if e.refused], ids=lambda e: e.name)
def test_refused_entries_say_why(entry):
    from histoembed.models.encoders import load_encoder

    with pytest.raises(UserError, match="cannot be loaded") as e:
        load_encoder(entry.name)
    assert entry.refused in str(e.value)


@pytest.mark.parametrize("entry", [e for e in zoo.entries() if e.library == "timm" and not e.refused],
                         ids=lambda e: e.name)
def test_timm_entries_record_the_width_of_their_real_architecture(entry):
    """Built on the meta device at full size (no memory): the entry's dim is the network's under its rule."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(entry.architecture, pretrained=False, num_classes=0,
                                  **{**entry.shape_args, **_layer_classes(entry.model_args)})
    width = model.num_features
    assert entry.dim == (2 * width if entry.pool == "cls+mean" else width)
    if entry.pool != "avg":
        assert model.num_prefix_tokens == _prefix_tokens(entry)


def test_registering_a_name_twice_is_an_error():
    registry = zoo.Registry()
    entry = zoo.get("uni")
    registry.register(entry)
    with pytest.raises(ValueError, match="twice"):
        registry.register(dataclasses.replace(entry, hub_id="someone/else"))
    assert registry.entries() == [entry] and registry.get("uni") is entry and registry.get("nope") is None


def test_entries_carry_what_their_cards_prescribe():
    assert zoo.get("virchow2").pool == zoo.get("midnight").pool == "cls+mean"
    assert zoo.get("h-optimus-0").norm == zoo.get("h0-mini").norm == zoo.BIOPTIMUS
    assert zoo.get("midnight").norm == zoo.get("kaiko-vit-b16").norm == zoo.HALF
    assert zoo.get("uni2-h").model_args["reg_tokens"] == 8
    assert zoo.get("uni2-h").model_args["mlp_layer"] == "SwiGLUPacked"
    for e in zoo.entries():
        assert e.licence and e.hub_id and e.dim > 0


def test_pooling_leaves_the_register_tokens_out():
    """Known tokens: CLS = 1, four registers = 1000, patches = 2 and 4; registers must not reach the mean."""
    tokens = torch.tensor([[1.0], [1000.0], [1000.0], [1000.0], [1000.0], [2.0], [4.0]]).T[:, :, None].repeat(2, 1, 3)
    assert pool_tokens(tokens, 5, "cls").tolist() == [[1.0] * 3] * 2
    assert pool_tokens(tokens, 5, "mean").tolist() == [[3.0] * 3] * 2
    assert pool_tokens(tokens, 5, "cls+mean").tolist() == [[1.0] * 3 + [3.0] * 3] * 2


def test_timm_features_count_prefix_tokens_from_the_model():
    class Tokens(torch.nn.Module):
        num_prefix_tokens = 5

        def forward_features(self, x):
            return torch.tensor([[[1.0], [9.0], [9.0], [9.0], [9.0], [2.0], [4.0]]])

    assert timm_features(Tokens(), torch.zeros(1), "cls+mean").tolist() == [[1.0, 3.0]]

    class FeatureMap(torch.nn.Module):
        def forward_features(self, x):
            return torch.arange(8.0).view(1, 2, 2, 2)

    assert timm_features(FeatureMap(), torch.zeros(1), "cls").tolist() == [[1.5, 5.5]]


def test_timm_encoders_from_the_cache_run_embed_fit_submit_predict_offline(zoo_cache, tmp_path):
    """By registry name (Virchow2's construction: SwiGLU, 4 registers, CLS + mean) and by hf-hub: id, side by side
    on the same crops and views, then each through fit, submit and predict, offline, in a process whose
    HF_HUB_CACHE is the stand-ins' cache (one process for all the commands: the console script and
    ``python -m histoembed`` are run as processes by test_end_to_end and test_fullscale)."""
    import csv
    import io

    from histoembed.core import feature_store
    from histoembed.tools.synthetic import make_dataset
    from test_end_to_end import small_settings_toml

    cache, _ = zoo_cache
    make_dataset(tmp_path / "data", n_train=30, n_test=4, seed=5, outliers=False)
    (tmp_path / "histoembed.toml").write_text(small_settings_toml("h0-mini").replace("size = 64", "size = 32"))
    by_id = "hf-hub:" + zoo.get("kaiko-vit-b16").hub_id
    image = sorted((tmp_path / "data" / "test_data").glob("img_*"))[0]
    commands = [["qc"], ["crops"], ["embed", "--encoder", "virchow2", "--encoder", by_id, "--repeats", "2"]]
    for name in ("virchow2", by_id):
        commands += [["fit", "--encoder", name, "--folds", "2"], ["submit"], ["predict", str(image), "--device", "cpu"]]
    results = in_one_process(cache, commands, cwd=tmp_path)

    run = tmp_path / "run"
    stores = {name: feature_store.read_features(feature_store.find_feature_store(run, name)) for name in ("virchow2", by_id)}
    keys = {name: sorted(zip(f.image_id.tolist(), f.crop_index.tolist(), f.view.tolist()))
            for name, f in stores.items()}
    assert keys["virchow2"] == keys[by_id] and len(keys["virchow2"]) > 0      # the same crops and views
    assert stores["virchow2"].meta["pool"] == "cls+mean" and stores["virchow2"].embedding.shape[1] == 64
    assert stores[by_id].meta["pool"] == "cls" and stores[by_id].embedding.shape[1] == 32
    submits = [r for r in results if r["args"][0] == "submit"]
    predicts = [r for r in results if r["args"][0] == "predict"]
    assert len(submits) == len(predicts) == 2          # one of each per encoder
    for submit, predict in zip(submits, predicts):
        assert len(list(csv.reader(io.StringIO(submit["submission"])))) == 1 + 4
        assert image.name in predict["output"]
