"""Feature extractors for evaluation: Inception (FID, IS) and CLIP (text-image, image-image).

``kind="real"``: the FID Inception-v3 with the standard ``pt_inception-2015-12-05`` weights
(m2m_ray/eval/inception.py; path, s3:// or URL) and a Hugging Face CLIP by hub id or local folder
(default ``openai/clip-vit-large-patch14``). ``kind="tiny"``: seeded random stand-ins of the same
interfaces, offline and fast, for tests and the tiny demo; every report built from them says
so in its title, because their numbers measure nothing. ``kind="shapes"``: the shapes world's
read-out behind the same interface (``shapes_extractors.py``).

CLIP preprocessing is written out here (no image-processor download): resize the shorter side to the
model's image size with bicubic resampling, center crop, scale to [0, 1] and normalise with OpenAI's
mean/std — the steps of ``CLIPImageProcessor``. Text goes through the real CLIP BPE
(m2m_ray.models.clip_tokenizer), truncated to 77 tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from m2m_ray.eval.inception import load_fid_inception

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

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size),
                          mode="bilinear", align_corners=False)  # (B, 3, 64, 64)
        x = x / 255.0 * 2.0 - 1.0
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


def load_clip(model_id: str):
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(model_id)
    except Exception as err:  # hub/cache errors come as OSError, ValueError or HTTP errors
        raise FileNotFoundError(
            f"could not load CLIP from {model_id!r} ({type(err).__name__}: {err}). This machine "
            "may be offline or lack the model in its Hugging Face cache: download it once "
            "(huggingface-cli download ...) or set extractors.clip_model_id to a local folder; "
            "for an offline run use --extractors.kind=tiny (numbers are then meaningless)."
        ) from err


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


def extractor_label(cfg: "EvalExtractorsConfig") -> str:
    """What the numbers were measured with, for every report."""
    if cfg.kind == "tiny":
        return TINY_LABEL.format(seed=cfg.tiny_seed)
    if cfg.kind == "shapes":
        from m2m_ray.eval.shapes_extractors import SHAPES_LABEL

        return SHAPES_LABEL
    return f"FID Inception-v3 ({cfg.inception_weights}); CLIP {cfg.clip_model_id}"


class Extractors:
    """Inception and CLIP on one device: what one evaluation actor holds."""

    def __init__(self, cfg: "EvalExtractorsConfig", device: str = "cpu",
                 storage: "StorageConfig | None" = None) -> None:
        from m2m_ray.models.clip_tokenizer import clip_tokenizer

        self.kind = cfg.kind
        self.device = torch.device(device)
        self.image_batch_size = cfg.image_batch_size
        if cfg.kind == "tiny":
            self.inception = _seeded(TinyInception, cfg.tiny_seed)
            self.clip = tiny_clip(cfg.tiny_seed + 1)
        else:
            self.inception = load_fid_inception(cfg.inception_weights, storage)
            self.clip = load_clip(cfg.clip_model_id)
        self.label = extractor_label(cfg)
        self.inception = self.inception.to(self.device).eval().requires_grad_(False)
        self.clip = self.clip.to(self.device).eval().requires_grad_(False)
        self.clip_size = int(self.clip.config.vision_config.image_size)
        self.tokenizer = clip_tokenizer()
        self.feature_dim = int(self.inception.feature_dim)
        self.num_classes = int(self.inception.num_classes)

    def _chunks(self, items: Sequence) -> list[Sequence]:
        step = self.image_batch_size
        return [items[i:i + step] for i in range(0, len(items), step)]

    @torch.inference_mode()
    def inception_features(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Pool features (N, d) and unbiased logits (N, C), float32."""
        pools, logits = [], []
        size = self.inception.input_size
        for chunk in self._chunks(images):
            # Resize each image on its own (sizes may differ), as the net would: then stack.
            pixels = torch.cat([
                F.interpolate(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
                              [None].to(self.device, torch.float32), size=(size, size),
                              mode="bilinear", align_corners=False)
                for img in chunk])  # (n, 3, size, size), values in [0, 255]
            pool, logit = self.inception(pixels)  # (n, d), (n, C)
            pools.append(pool.float().cpu().numpy())
            logits.append(logit.float().cpu().numpy())
        return np.concatenate(pools), np.concatenate(logits)

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
        from m2m_ray.eval.shapes_extractors import ShapesExtractors

        return ShapesExtractors(cfg.image_batch_size, device)
    return Extractors(cfg, device, storage)
