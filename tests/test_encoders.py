"""The encoder registry: the same code path loads Phikon-v2, any HF folder and the packaged EfficientNet."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from histoembed.core.errors import UserError
from histoembed.models import zoo
from histoembed.models.encoders import load_encoder


def _direct_tokens(path, x01: torch.Tensor, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    from transformers import Dinov2Model

    model = Dinov2Model.from_pretrained(path).eval()
    x = (x01 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def test_a_saved_dinov2_loads_by_path_with_cls_pooling(tiny_dinov2):
    enc = load_encoder(str(tiny_dinov2))
    assert (enc.dim, enc.size, enc.pool, enc.precision) == (32, 32, "cls", "fp32")
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406))
    digest = hashlib.sha256((tiny_dinov2 / "model.safetensors").read_bytes()).hexdigest()
    assert enc.weights_hash == digest
    assert enc.slug == tiny_dinov2.name
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(enc(x), _direct_tokens(tiny_dinov2, x)[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pool", ["mean", "cls+mean"])
def test_mean_pooling_averages_the_patch_tokens(tiny_dinov2, pool):
    enc = load_encoder(str(tiny_dinov2), pool=pool)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = _direct_tokens(tiny_dinov2, x)
    expected = tokens[:, 1:].mean(1) if pool == "mean" else torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], 1)
    assert enc.dim == expected.shape[1]
    torch.testing.assert_close(enc(x), expected, atol=1e-5, rtol=0)


def test_other_sizes_are_resized_to_the_model_input(tiny_dinov2):
    enc = load_encoder(str(tiny_dinov2))
    big = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    small = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(enc(big), enc(small))


def test_the_preprocessor_config_sets_size_and_normalisation(tiny_dinov2, tmp_path):
    import shutil
    folder = tmp_path / "with-preprocessor"
    shutil.copytree(tiny_dinov2, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "crop_size": {"height": 48, "width": 48},
         "size": {"shortest_edge": 56}}))
    enc = load_encoder(str(folder))
    assert (enc.size, enc.mean, enc.std) == (48, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    x = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(enc(x), _direct_tokens(folder, x, (0.5,) * 3, (0.25,) * 3)[:, 0], atol=1e-5, rtol=0)


def test_a_folder_without_config_is_refused_by_name(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="no config.json") as e:
        load_encoder(str(tmp_path))
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("model, message", [("tiny_dinov2", "no safetensors weights"),
                                            ("timm_folder", "no model.safetensors")])
def test_pickled_weights_are_never_loaded(model, message, tmp_path, request):
    """transformers and timm folders alike: a pytorch_model.bin is never unpickled."""
    import shutil
    folder = tmp_path / "pickled"
    shutil.copytree(request.getfixturevalue(model), folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UserError, match=message):
        load_encoder(str(folder))


def _closed_port() -> int:
    """A local port nothing listens on: a connection to it is refused at once, as a hub out of reach."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("encoder", ["phikon-v2", "hf-hub:someone/absent"])
def test_a_hub_model_neither_cached_nor_reachable_is_named_before_any_hub_retry(encoder, tmp_path, cli, monkeypatch):
    """Issue 36: offline, embed said how to get the weights only after huggingface_hub's retries (about 50 s).
    Now the cache is looked at first, then (offline mode off) one request to the hub; no loader is reached."""
    import transformers
    import transformers.utils
    from huggingface_hub import constants
    from test_embed import write_crops

    from histoembed.models import sources

    def the_retry_path(*args, **kwargs):
        pytest.fail("a loader asked the hub, whose client retries for most of a minute")

    for loader in (transformers.AutoConfig, transformers.AutoModel):
        monkeypatch.setattr(loader, "from_pretrained", the_retry_path)
    monkeypatch.setattr(transformers.utils, "cached_file", the_retry_path)   # config.json of timm and transformers
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    write_crops(tmp_path)
    hub_id = zoo.get(encoder).hub_id if zoo.get(encoder) else encoder.removeprefix("hf-hub:")

    probe = sources.hub_answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")  # refuses at once
    for offline, said in ((True, "offline mode is on"), (False, "cannot be reached")):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
        monkeypatch.setattr(sources, "hub_answers", the_retry_path if offline else probe)  # offline: not asked
        r = cli("embed", "--run", tmp_path, "--encoder", encoder, "--repeats", "2")
        assert r.exit_code == 2 and hub_id in r.output and said in r.output, r.output
        assert "--encoder efficientnet-lite0" in r.output and "--encoder ./phikon-v2" in r.output


def test_a_cached_model_loads_from_the_cache_when_the_hub_is_out_of_reach(tiny_dinov2, tmp_path, hub_layout,
                                                                          monkeypatch):
    """A hub that answers gets the hub id (the loader may refresh the model); one out of reach, the cached copy."""
    from huggingface_hub import constants

    from histoembed.models import sources

    hub_layout(tmp_path / "hub", "owkin/phikon-v2",
               {name: (tiny_dinov2 / name).read_bytes() for name in ("config.json", "model.safetensors")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub) as hub:
        threading.Thread(target=hub.serve_forever, daemon=True).start()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{hub.server_port}")
        assert sources.hub_source("owkin/phikon-v2") == "owkin/phikon-v2"
        hub.shutdown()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    snapshot = sources.cached_snapshot("owkin/phikon-v2")
    assert sources.hub_source("owkin/phikon-v2") == str(snapshot) and snapshot.parent.parent.name.endswith("phikon-v2")
    enc = load_encoder("phikon-v2")
    assert enc.encoder_id == "owkin/phikon-v2" and enc.weights_hash == load_encoder(str(tiny_dinov2)).weights_hash


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(tiny_dinov2):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="no CUDA GPU"):
        load_encoder(str(tiny_dinov2), device="cuda")


def test_registry_names_phikon_v2_and_the_offline_encoder():
    assert zoo.get("phikon-v2").hub_id == "owkin/phikon-v2"
    assert zoo.get("efficientnet-lite0").library == "packaged"


@pytest.mark.parametrize("photo, classes", [
    ("chelsea", {281, 282, 283, 284, 285}),   # tabby / tiger / Persian / Siamese / Egyptian cat
    ("coffee", {504, 967, 968}),              # coffee mug / espresso / cup
])
def test_the_offline_encoder_has_real_imagenet_weights(photo, classes):
    skdata = pytest.importorskip("skimage.data")
    enc = load_encoder("efficientnet-lite0")
    assert (enc.dim, enc.size) == (1280, 224)
    img = getattr(skdata, photo)()
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255
    logits = enc.module._fc(enc(x))  # the ImageNet classifier on our pooled features
    assert int(logits.argmax()) in classes


def test_bf16_autocast_stays_close_to_fp32(tiny_dinov2):
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    fp32 = load_encoder(str(tiny_dinov2), precision="fp32")(x)
    bf16 = load_encoder(str(tiny_dinov2), precision="bf16")
    assert bf16.precision == "bf16"
    out = bf16(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, fp32).min() > 0.99


def test_bf16_weights_copy_stays_close_to_fp32_and_leaves_the_fp32_module_alone(tiny_dinov2):
    """The CUDA path (``cast_weights``), run here on the CPU: a bf16 copy of the weights, made once."""
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    enc = load_encoder(str(tiny_dinov2), precision="bf16")
    assert not enc.cast_weights  # autocast on the CPU; the copy is what load_encoder picks on CUDA
    enc = dataclasses.replace(enc, cast_weights=True)
    out = enc(x)
    assert out.dtype == torch.float32
    assert {p.dtype for p in enc.casts[torch.bfloat16].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in enc.module.parameters()} == {torch.float32}
    fp32 = enc.with_precision("fp32")(x)
    assert torch.equal(fp32, load_encoder(str(tiny_dinov2), precision="fp32")(x))
    assert torch.nn.functional.cosine_similarity(out, fp32).min() > 0.99
    enc(x)
    assert len(enc.casts) == 1


def test_glibc_heap_tuning_applies_on_linux_and_can_be_turned_off(monkeypatch):
    from histoembed.models.encoders import keep_large_buffers_in_heap

    monkeypatch.setenv("HISTOEMBED_MALLOC_TUNING", "0")
    assert keep_large_buffers_in_heap.__wrapped__() is False
    monkeypatch.delenv("HISTOEMBED_MALLOC_TUNING")
    if sys.platform.startswith("linux"):
        assert keep_large_buffers_in_heap.__wrapped__() is True


# ---------------------------------------------------------------- timm

def _timm_direct(folder, x01: torch.Tensor, pool: str = "cls") -> torch.Tensor:
    """A direct timm forward of a folder written by timm: preprocessing from its pretrained_cfg, CLS token."""
    import timm
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    model = timm.create_model(config["architecture"], pretrained=False, **config["model_args"]).eval()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    cfg = config["pretrained_cfg"]
    x = (x01 - torch.tensor(cfg["mean"]).view(1, 3, 1, 1)) / torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = model.forward_features(x)
    k = model.num_prefix_tokens
    return tokens[:, 0] if pool == "cls" else torch.cat([tokens[:, 0], tokens[:, k:].mean(1)], 1)


@pytest.fixture(scope="module")
def timm_folder(tmp_path_factory):
    """A tiny ViT with 4 register tokens and LayerScale, written by timm's own ``save_for_hf``."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, reg_tokens=4, init_values=0.5, num_classes=3).eval()
    folder = tmp_path_factory.mktemp("tiny-timm")
    save_for_hf(model, str(folder), safe_serialization=True, data_config={"mean": (0.5, 0.4, 0.3), "std": (0.2,) * 3})
    return folder


def test_a_folder_written_by_timm_loads_with_its_own_preprocessing(timm_folder):
    enc = load_encoder(str(timm_folder))
    assert (enc.dim, enc.size, enc.pool, enc.mean, enc.std) == (32, 32, "cls", (0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(enc(x), _timm_direct(timm_folder, x), atol=1e-4, rtol=0)
    enc = load_encoder(str(timm_folder), pool="cls+mean")   # registers (tokens 1-4) left out of the mean
    assert enc.dim == 64
    torch.testing.assert_close(enc(x), _timm_direct(timm_folder, x, "cls+mean"), atol=1e-4, rtol=0)


# One child process for every load from a Hugging Face cache (its location is read when huggingface_hub is
# imported): the default encoder by name, a timm model by hf-hub: id, and an id the cache lacks.
FROM_THE_CACHE = """
import json, torch
from histoembed.models.encoders import load_encoder
e = load_encoder('phikon-v2')
out = {'phikon-v2': [e.encoder_id, e.dim, e.weights_hash]}
e = load_encoder('hf-hub:someone/tiny-vit')
x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
out['tiny-vit'] = [e.encoder_id, e.weights_hash, e(x).tolist()]
try:
    load_encoder('hf-hub:someone/absent')
    out['absent'] = None
except Exception as error:
    out['absent'] = f"{type(error).__name__}: {error}"
print(json.dumps(out))
"""


def test_encoders_load_from_the_hugging_face_cache_offline_and_a_missing_one_says_where_it_looked(
        tiny_dinov2, timm_folder, tmp_path, hub_layout):
    """The default encoder (Phikon-v2) and a timm model by hf-hub: id through the real hub path, a cache laid out
    as huggingface_hub writes it; an id missing from the cache is named, with offline mode, in the error."""
    phikon = {name: (tiny_dinov2 / name).read_bytes() for name in ("config.json", "model.safetensors")}
    hub_layout(tmp_path / "hub", "owkin/phikon-v2", phikon)
    files = {f.name: f.read_bytes() for f in timm_folder.iterdir() if f.is_file()}
    hub_layout(tmp_path / "hub", "someone/tiny-vit", files)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", FROM_THE_CACHE], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])

    assert out["phikon-v2"] == ["owkin/phikon-v2", 32, hashlib.sha256(phikon["model.safetensors"]).hexdigest()]

    encoder_id, weights_hash, feats = out["tiny-vit"]
    assert encoder_id == "hf-hub:someone/tiny-vit"
    assert weights_hash == hashlib.sha256(files["model.safetensors"]).hexdigest()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(torch.tensor(feats), _timm_direct(timm_folder, x), atol=1e-4, rtol=0)

    assert out["absent"] is not None                  # the load failed
    assert "someone/absent" in out["absent"] and "offline mode is on" in out["absent"]


def test_weights_that_do_not_fit_the_named_architecture_are_refused(timm_folder, tmp_path):
    import shutil
    folder = tmp_path / "wrong"
    shutil.copytree(timm_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_args"]["reg_tokens"] = 0        # the card's register tokens forgotten
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="do not fit"):
        load_encoder(str(folder))


def test_a_registry_entry_reads_its_weights_from_the_models_folder(tmp_path, monkeypatch):
    """$HISTOEMBED_MODELS/<name>/ serves an entry offline, and the entry's normalisation overrides the folder's."""
    import timm
    from timm.models import save_for_hf

    from histoembed.models.weights import weights_available
    from histoembed.models.zoo import HALF, get

    monkeypatch.setenv("HISTOEMBED_MODELS", str(tmp_path))
    assert weights_available(get("kaiko-vit-b16")) == ""
    torch.manual_seed(1)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2, num_classes=0).eval()
    save_for_hf(model, str(tmp_path / "kaiko-vit-b16"), safe_serialization=True)
    assert weights_available(get("kaiko-vit-b16")) == "folder"
    enc = load_encoder("kaiko-vit-b16")
    assert (enc.mean, enc.std) == HALF and enc.encoder_id == str(tmp_path / "kaiko-vit-b16")
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.forward_features((x - 0.5) / 0.5)[:, 0]
    torch.testing.assert_close(enc(x), expected, atol=1e-4, rtol=0)
