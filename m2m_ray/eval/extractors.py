"""Feature extractors for evaluation: Inception (FID, IS), CLIP (text-image, image-image) and
DINO (image-image).

``kind="real"``: the FID Inception-v3 with the standard ``pt_inception-2015-12-05`` weights
(m2m_ray/eval/inception.py; path, s3:// or URL), read once per FID resize of
``fid_resizes`` (``legacy_pytorch``, ``clean``); a Hugging Face CLIP by hub id or local folder
(default ``openai/clip-vit-large-patch14``, ViT-L/14; ``openai/clip-vit-base-patch32`` for
ViT-B/32); DINO ViT-S/16 (``facebook/dino-vits16``) through ``transformers.ViTModel``.
``kind="tiny"``: seeded random stand-ins of the same interfaces, offline and fast, for tests and
the tiny demo; every report built from them says so in its title, because their numbers measure
nothing. ``kind="shapes"``: the shapes world's read-out behind the same interface
(``shapes_extractors.py``).

CLIP preprocessing is written out here (no image-processor download): resize the shorter side to the
model's image size with bicubic resampling, center crop, scale to [0, 1] and normalise with OpenAI's
mean/std — the steps of ``CLIPImageProcessor``. Text goes through the real CLIP BPE
(m2m_ray.models.clip_tokenizer), truncated to 77 tokens.

DINO preprocessing is DreamBench's (Ruiz et al., DreamBooth, CVPR 2023, §4.1; the DINO repo's
evaluation transform): shorter side → 256 with bicubic resampling, centre crop 224, scale to
[0, 1], ImageNet mean/std — through transformers' ``BitImageProcessorPil`` with those settings,
not the checkpoint's own processor config (which resizes straight to 224). Its centre crop starts
at ``(size − 224) // 2`` where torchvision's ``CenterCrop`` rounds half to even: the two differ by
one pixel only for odd margins m with ⌊m/2⌋ odd, never for square images. The embedding is the
[CLS] token after the final layer norm (``last_hidden_state[:, 0]``, DINO's own output; the
checkpoint has no pooler).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from m2m_ray.eval.inception import (
    FID_RESIZES,
    load_fid_inception,
    resize_image,
    scale_input,
)
from m2m_ray.eval.shapes_extractors import ShapesExtractors, describe_shapes
from m2m_ray.formats.rng import Salt
from m2m_ray.models.clip_tokenizer import clip_tokenizer

if TYPE_CHECKING:
    from m2m_ray.config import StorageConfig
    from m2m_ray.eval.config import EvalExtractorsConfig

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_LABEL = ("TINY RANDOM EXTRACTORS (seed {seed}): for tests and the offline demo only; these "
              "numbers measure nothing and are not comparable to any published FID/IS/CLIP score")

TINY_CLIP_TEXT = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                      bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
TINY_CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
# DINO's input is DreamBench's 224 crop whatever the model: a tiny ViT with 16 px patches at 224.
TINY_DINO = dict(image_size=224, patch_size=16, hidden_size=32, intermediate_size=64,
                 num_hidden_layers=2, num_attention_heads=4)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_RESIZE, DINO_CROP = 256, 224  # DreamBench: shorter side → 256 (bicubic), centre crop 224
DINO_PREPROCESS = (f"shorter side → {DINO_RESIZE} bicubic, centre crop {DINO_CROP}, ImageNet "
                   "mean/std (DreamBench); [CLS] embedding; 100·cos")
# ViT sizes by (width, depth) as the field names them: B, L, H (Dosovitskiy et al. 2021), S (DeiT,
# Touvron et al. 2021, the size of DINO ViT-S), bigG (OpenCLIP).
VIT_SIZES = {(384, 12): "S", (768, 12): "B", (1024, 24): "L", (1280, 32): "H", (1664, 48): "bigG"}


class TinyInception(nn.Module):
    """A seeded random conv net with the FID Inception's interface: (pool, logits) per image."""

    input_size = 64
    feature_dim = 32
    num_classes = 10
    feature_scale = 50.0  # random convs give features ~0.02 apart: spread them to ~1 (and IS > 1)

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, self.feature_dim, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(self.feature_dim, self.num_classes)

    def forward_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: resized and scaled input (B, 3, 64, 64), as ``FIDInceptionV3.forward_input``."""
        x = F.relu(self.conv2(F.relu(self.conv1(x))))  # (B, 32, 16, 16)
        pool = x.mean(dim=(2, 3)) * self.feature_scale  # (B, 32)
        return pool, pool @ self.fc.weight.T  # (B, 32), (B, 10)


def _seeded(build, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tiny_clip(seed: int):
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=TINY_CLIP_TEXT, vision_config=TINY_CLIP_VISION,
                        projection_dim=32)
    return _seeded(lambda: CLIPModel(config), seed)


def tiny_dino(seed: int):
    from transformers import ViTConfig, ViTModel

    return _seeded(lambda: ViTModel(ViTConfig(**TINY_DINO), add_pooling_layer=False), seed)


def load_dino(model_id: str):
    """A DINO ViT (default ``facebook/dino-vits16``) from the hub or a local folder, without the
    pooler (the checkpoint has none). Raises ``FileNotFoundError`` naming the offline options."""
    from transformers import ViTModel

    return _from_hub(ViTModel.from_pretrained, model_id, "DINO", "dino_model_id",
                     "or null for no DINO score", add_pooling_layer=False)


def _from_hub(load, model_id: str, what: str, key: str, alternative: str = "", **kwargs):
    """``load(model_id, **kwargs)``; a failure (offline machine, missing cache) raises
    ``FileNotFoundError`` saying how to get the model or run offline."""
    hub_id = model_id if not model_id.startswith(("/", ".", "s3://")) else "<hub id>"
    try:
        return load(model_id, **kwargs)
    except Exception as err:  # hub/cache errors come as OSError, ValueError or HTTP errors
        raise FileNotFoundError(
            f"could not load {what} from {model_id!r} ({type(err).__name__}: {err}). This machine "
            "may be offline or lack the model in its Hugging Face cache: download it once "
            f"(huggingface-cli download {hub_id}) or set extractors.{key} to a local folder"
            f"{', ' + alternative if alternative else ''}; for an offline run use "
            "--extractors.kind=tiny (numbers are then meaningless).") from err


def dino_processor():
    """DreamBench's DINO preprocessing as a transformers image processor (see module doc)."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(
        size={"shortest_edge": DINO_RESIZE}, crop_size={"height": DINO_CROP, "width": DINO_CROP},
        resample=PILImageResampling.BICUBIC, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)


def vit_name(config) -> str:
    """The field's name of a ViT backbone from its (vision) config: ``ViT-L/14``, ``ViT-B/32``,
    ``ViT-S/16``, with ``@<n>px`` when the input is not 224; other sizes spell out width and
    depth."""
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    size = VIT_SIZES.get((hidden, layers), f"(width {hidden}, depth {layers})")
    at = "" if int(config.image_size) == 224 else f"@{int(config.image_size)}px"
    return f"ViT-{size}/{int(config.patch_size)}{at}"


def load_clip(model_id: str):
    """A CLIP model from the hub or a local folder; ``FileNotFoundError`` naming the options."""
    from transformers import CLIPModel

    return _from_hub(CLIPModel.from_pretrained, model_id, "CLIP", "clip_model_id")


def clip_pixels(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """CLIP input (N, 3, size, size): shorter side → size (bicubic), center crop, normalise."""
    arrays = []
    for image in images:
        width, height = image.size
        scale = size / min(width, height)
        new_w, new_h = (size, int(height * scale)) if width <= height else (int(width * scale),
                                                                              size)
        resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        arrays.append(np.asarray(resized.crop((left, top, left + size, top + size))))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std  # (N, 3, size, size)


FID_NETWORK = ("FID Inception-v3: TF inception-2015-12-05 ported to PyTorch "
               "(pt_inception-2015-12-05, as pytorch-fid / torch-fidelity / torchmetrics), "
               "input 299²")
CLIP_PREPROCESS = ("shorter side → image size bicubic, centre crop, OpenAI mean/std "
                   "(CLIPImageProcessor); score w·max(100·cos, 0)")
# Backbones of the usual hub ids, so the driver names them without reading their configs (each
# checked against vit_name of the published architecture in tests/test_eval_extractors.py).
KNOWN_BACKBONES = {"openai/clip-vit-large-patch14": "ViT-L/14",
                   "openai/clip-vit-base-patch32": "ViT-B/32",
                   "openai/clip-vit-large-patch14-336": "ViT-L/14@336px",
                   "facebook/dino-vits16": "ViT-S/16"}


def _backbone_of(model_id: str) -> str:
    """``vit_name`` of a hub id or local folder (its config.json only; the known ids need none)."""
    if model_id in KNOWN_BACKBONES:
        return KNOWN_BACKBONES[model_id]
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_id)
    except Exception as err:  # hub/cache errors come as OSError, ValueError or HTTP errors
        raise FileNotFoundError(f"could not read the config of {model_id!r} to name its "
                                f"backbone ({type(err).__name__}: {err})") from err
    return vit_name(getattr(config, "vision_config", config))


def describe_extractors(cfg: "EvalExtractorsConfig") -> dict:
    """Every backbone and every resize behind the report's numbers: ``{"label": str, "fid":
    {network, weights, features, resizes: {name: what}}, "is": {network, resize}, "clip":
    {backbone, model, preprocess}, "dino": {backbone, model, preprocess} | None}``. Shapes: the
    read-out instead. Raises ``FileNotFoundError`` when a local model's config is unreadable."""
    if cfg.kind == "shapes":
        return describe_shapes()
    from types import SimpleNamespace

    tiny = cfg.kind == "tiny"
    resizes = {name: FID_RESIZES[name] for name in cfg.fid_resizes}
    network = ("TinyInception: seeded random 2-conv net, 32-d features, 10 classes (input 64²)"
               if tiny else FID_NETWORK)
    clip_backbone = (vit_name(SimpleNamespace(**TINY_CLIP_VISION)) + " (tiny, random)" if tiny
                     else _backbone_of(cfg.clip_model_id))
    description = {
        "fid": {"network": network, "weights": "random" if tiny else cfg.inception_weights,
                "features": f"{TinyInception.feature_dim if tiny else 2048}-d pool features; "
                            "mean and unbiased covariance in float64 over the whole set",
                "resizes": resizes},
        "is": {"network": network, "resize": cfg.fid_resizes[0]},
        "clip": {"backbone": clip_backbone, "model": "tiny random CLIP" if tiny
                 else cfg.clip_model_id, "preprocess": CLIP_PREPROCESS},
        "dino": None if cfg.dino_model_id is None else {
            "backbone": (vit_name(SimpleNamespace(**TINY_DINO)) + " (tiny, random)" if tiny
                         else _backbone_of(cfg.dino_model_id)),
            "model": "tiny random ViT" if tiny else cfg.dino_model_id,
            "preprocess": DINO_PREPROCESS},
    }
    names = (f"FID: {network} ({', '.join(resizes)} resize); CLIP {clip_backbone}"
             + ("" if description["dino"] is None
                else f"; DINO {description['dino']['backbone']}"))
    description["label"] = (TINY_LABEL.format(seed=cfg.tiny_seed) + ". " + names if tiny
                            else names)
    return description


def extractor_label(cfg: "EvalExtractorsConfig") -> str:
    """What the numbers were measured with, in one line, for every report."""
    return describe_extractors(cfg)["label"]


class Extractors:
    """Inception, CLIP and DINO on one device: what one evaluation actor holds."""

    def __init__(self, cfg: "EvalExtractorsConfig", device: str = "cpu",
                 storage: "StorageConfig | None" = None) -> None:
        self.kind = cfg.kind
        self.device = torch.device(device)
        self.image_batch_size = cfg.image_batch_size
        self.fid_resizes = tuple(cfg.fid_resizes)
        if cfg.kind == "tiny":
            self.inception = _seeded(TinyInception, cfg.tiny_seed)
            self.clip = tiny_clip(cfg.tiny_seed + Salt.TINY_CLIP_INIT)
            self.dino = None if cfg.dino_model_id is None else tiny_dino(cfg.tiny_seed + Salt.TINY_DINO_INIT)
        else:
            self.inception = load_fid_inception(cfg.inception_weights, storage)
            self.clip = load_clip(cfg.clip_model_id)
            self.dino = None if cfg.dino_model_id is None else load_dino(cfg.dino_model_id)
        self.label = extractor_label(cfg)
        self.inception = self.inception.to(self.device).eval().requires_grad_(False)
        self.clip = self.clip.to(self.device).eval().requires_grad_(False)
        self.clip_size = int(self.clip.config.vision_config.image_size)
        if self.dino is not None:
            self.dino = self.dino.to(self.device).eval().requires_grad_(False)
            self.dino_processor = dino_processor()
        self.tokenizer = clip_tokenizer()
        self.feature_dim = int(self.inception.feature_dim)
        self.num_classes = int(self.inception.num_classes)

    def _chunks(self, items: Sequence) -> list[Sequence]:
        step = self.image_batch_size
        return [items[i:i + step] for i in range(0, len(items), step)]

    @torch.inference_mode()
    def inception_features(self, images: Sequence[Image.Image]
                           ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Pool features per FID resize, ``{resize: (N, d)}``, and the unbiased logits (N, C) of
        the first resize (IS), float32. Each image is resized on its own (sizes may differ)."""
        pools: dict[str, list[np.ndarray]] = {name: [] for name in self.fid_resizes}
        logits = []
        size = self.inception.input_size
        for chunk in self._chunks(images):
            arrays = [np.asarray(img.convert("RGB")) for img in chunk]
            for name in self.fid_resizes:
                pixels = torch.stack([resize_image(a, name, size) for a in arrays])  # (n, 3, s, s)
                pool, logit = self.inception.forward_input(
                    scale_input(pixels, name).to(self.device))  # (n, d), (n, C)
                pools[name].append(pool.float().cpu().numpy())
                if name == self.fid_resizes[0]:
                    logits.append(logit.float().cpu().numpy())
        features = {name: np.concatenate(parts) for name, parts in pools.items()}
        return features, np.concatenate(logits)

    @torch.inference_mode()
    def dino_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised DINO [CLS] embeddings (N, h), float32, DreamBench preprocessing.
        Raises ``RuntimeError`` when ``dino_model_id`` is null."""
        if self.dino is None:
            raise RuntimeError("no DINO model (extractors.dino_model_id is null)")
        out = []
        for chunk in self._chunks(images):
            pixels = self.dino_processor(images=[img.convert("RGB") for img in chunk],
                                         return_tensors="pt")["pixel_values"]  # (n, 3, 224, 224)
            hidden = self.dino(pixel_values=pixels.to(self.device)).last_hidden_state  # (n, L, h)
            out.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu().numpy())  # [CLS]
        return np.concatenate(out)

    @torch.inference_mode()
    def clip_image_embeddings(self, images: Sequence[Image.Image]) -> np.ndarray:
        """L2-normalised CLIP image embeddings (N, e), float32."""
        out = []
        for chunk in self._chunks(images):
            pixels = clip_pixels(chunk, self.clip_size).to(self.device)
            embeds = self.clip.get_image_features(pixel_values=pixels).pooler_output  # (n, e)
            out.append(F.normalize(embeds.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def clip_text_embeddings(self, captions: Sequence[str]) -> np.ndarray:
        """L2-normalised CLIP text embeddings (N, e), float32."""
        out = []
        for chunk in self._chunks(list(captions)):
            tokens = self.tokenizer(list(chunk), padding="max_length", truncation=True,
                                    max_length=self.tokenizer.model_max_length,
                                    return_tensors="pt").to(self.device)
            embeds = self.clip.get_text_features(
                input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
            ).pooler_output  # (n, e)
            out.append(F.normalize(embeds.float(), dim=-1).cpu().numpy())
        return np.concatenate(out)


def load_extractors(cfg: "EvalExtractorsConfig", device: str = "cpu",
                    storage: "StorageConfig | None" = None):
    """The extractors ``cfg.kind`` names: ``Extractors`` (real, tiny) or ``ShapesExtractors``."""
    if cfg.kind == "shapes":
        return ShapesExtractors(cfg.image_batch_size, device)
    return Extractors(cfg, device, storage)
