"""Train the shapes world's models on renders: the attribute read-out, the toy VAE, the toy
text-to-image teacher. Each is trained once, for as long as it needs, and shipped; nothing else in
the project trains them. Seeded: rerunning a command gives models that meet the same goals.

    python -m m2m_ray.shapes.train readout --out m2m_ray/shapes/readout
    python -m m2m_ray.shapes.train vae --out m2m_ray/models/weights/shapes
    python -m m2m_ray.shapes.train teacher --out m2m_ray/models/weights/shapes
    python -m m2m_ray.shapes.train dino --out m2m_ray/models/weights/shapes

``vae`` writes ``<out>/vae``; ``teacher`` reads ``<out>/vae`` and writes ``<out>/unet``,
``<out>/text_encoder`` and ``<out>/scheduler`` (the diffusers folder layout of SD-2.1-base, loaded by
the ``shapes`` model preset); ``dino`` writes ``<out>/dino``, M2M-DINO's frozen encoder, trained
self-supervised (``m2m_ray.shapes.dino``). Each command ends with its held-out evaluation
(``m2m_ray.shapes.evaluate``; the DINO's linear probe) and writes it as ``<folder>/training.json``
beside the weights.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from m2m_ray.formats.rng import Salt
from m2m_ray.shapes import evaluate, world
from m2m_ray.shapes.dino import train_dino
from m2m_ray.shapes.readout import HEADS, AttributeReadout, ReadoutNet, to_tensor
from m2m_ray.shapes.teacher import (
    build_teacher,
    teacher_scheduler,
    token_ids,
)
from m2m_ray.shapes.world import HELD_OUT, render_batch


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur (a VAE's softness) and noise, each on half of the batch: read-out robustness."""
    blur = torch.rand(x.shape[0], generator=generator) < 0.5
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x = torch.where(blur[:, None, None, None], F.conv2d(F.pad(x, (1, 1, 1, 1), "replicate"),
                                                             kernel, groups=3), x)
    noise = torch.randn(x.shape, generator=generator) * 0.03
    noisy = torch.rand(x.shape[0], generator=generator) < 0.5
    return (x + noise * noisy[:, None, None, None]).clamp(0, 1)


def _log(what: str, step: int, steps: int, started: float, **values: float) -> None:
    shown = " ".join(f"{k} {v:.4f}" for k, v in values.items())
    print(f"[{what}] step {step}/{steps} {shown} ({time.perf_counter() - started:.0f} s)",
          flush=True)


# --- read-out ------------------------------------------------------------------------------------


def train_readout(out: Path, steps: int, seed: int, batch: int = 128) -> dict[str, Any]:
    torch.manual_seed(seed)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    net = ReadoutNet()
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        images, attributes, _ = render_batch(rng, batch)
        logits = net(_augment(to_tensor(images), generator))
        targets = {"shape": [world.SHAPES.index(a.shape) for a in attributes],
                   "background": [world.BACKGROUNDS.index(a.background) for a in attributes],
                   "count": [a.count - 1 for a in attributes]}
        loss = sum(F.cross_entropy(logits[name], torch.tensor(targets[name])) for name in HEADS)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            _log("readout", step, steps, started, loss=float(loss))
    readout = AttributeReadout(net)
    report = {"steps": steps, "seed": seed, "seconds": round(time.perf_counter() - started, 1),
              "held_out": evaluate.readout_accuracy(readout, seed + Salt.HELD_OUT_EVAL)}
    readout.save(out, training=report)
    return report


# --- VAE -----------------------------------------------------------------------------------------

VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                  block_out_channels=(32, 64, 64), norm_num_groups=16, sample_size=32,
                  down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3)


def train_vae(out: Path, steps: int, seed: int, batch: int = 32, kl_weight: float = 1e-6
              ) -> dict[str, Any]:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL(**VAE_CONFIG).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-3, total_steps=steps,
                                                   pct_start=0.05)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        images, _, _ = render_batch(rng, batch)
        x = to_tensor(images) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss_rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = loss_rec + kl_weight * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            _log("vae", step, steps, started, loss=float(loss_rec))
    vae.eval()
    # SD's convention: latents are scaled to unit variance for the UNet (scaling_factor).
    with torch.no_grad():
        images, _, _ = render_batch(np.random.default_rng(seed + Salt.VAE_TRAINING_SAMPLES), 512)
        std = vae.encode(to_tensor(images) * 2 - 1).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    _save_half(vae, out / "vae")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()  # measure what ships
    report = {"steps": steps, "seed": seed, "batch": batch, "kl_weight": kl_weight,
              "seconds": round(time.perf_counter() - started, 1),
              "scaling_factor": vae.config.scaling_factor,
              "held_out": evaluate.vae_agreement(vae, AttributeReadout.load(), seed + Salt.HELD_OUT_EVAL)}
    (out / "vae" / "training.json").write_text(json.dumps(report, indent=2))
    return report


# --- teacher -------------------------------------------------------------------------------------


@torch.no_grad()
def encode_renders(vae, seed: int, count: int, exclude: tuple = ()
                   ) -> tuple[torch.Tensor, list[world.Attributes]]:
    """``count`` renders (without the ``exclude`` combinations) → scaled VAE latents (posterior
    mean, ``[count, 4, 8, 8]``) and their attributes: the teacher's training set, encoded once."""
    rng = np.random.default_rng(seed)
    latents, attributes = [], []
    while len(attributes) < count:
        images, batch_attributes, _ = render_batch(rng, 256, exclude=exclude)
        latents.append(vae.encode(to_tensor(images) * 2 - 1).latent_dist.mean)
        attributes += batch_attributes
    return torch.cat(latents)[:count] * vae.config.scaling_factor, attributes[:count]


def train_teacher(out: Path, steps: int, seed: int, batch: int = 128, lr: float = 1e-3,
                  caption_drop: float = 0.1, renders: int = 60000, resume: bool = False
                  ) -> dict[str, Any]:
    """SD's ε-objective on (caption, render) pairs, 10% captions dropped to "" (for guidance);
    the UNet and the text encoder train together from scratch. ``renders`` images are encoded
    once; every step draws new captions for them (varied wording of the same attributes).
    Attribute combinations in ``HELD_OUT`` never appear. ``resume``: start from the teacher saved
    in ``out`` (a further run with a fresh schedule) instead of from scratch."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + Salt.TEACHER_INIT)
    rng = np.random.default_rng(seed)
    vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False)
    started = time.perf_counter()
    latents, attributes = encode_renders(vae, seed, renders, HELD_OUT)
    print(f"[teacher] encoded {renders} renders in {time.perf_counter() - started:.0f} s",
          flush=True)
    unet, text_encoder, tokenizer = build_teacher()
    if resume:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(out / "unet").float().train()
        text_encoder = CLIPTextModel.from_pretrained(out / "text_encoder").float().train()
    scheduler = teacher_scheduler()
    alphas = scheduler.alphas_cumprod
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps,
                                                   pct_start=0.03)
    generator = torch.Generator().manual_seed(seed)
    ids_of: dict[str, torch.Tensor] = {}
    smooth = None
    for step in range(1, steps + 1):
        index = torch.randint(0, renders, (batch,), generator=generator)
        drop = (torch.rand(batch, generator=generator) < caption_drop).tolist()
        captions = ["" if d else world.caption(attributes[i], rng)
                    for i, d in zip(index.tolist(), drop)]
        missing = [c for c in dict.fromkeys(captions) if c not in ids_of]
        if missing:
            ids_of.update(zip(missing, token_ids(tokenizer, missing)))
        context = text_encoder(torch.stack([ids_of[c] for c in captions]))[0]  # (B, 77, D)
        t = torch.randint(0, len(alphas), (batch,), generator=generator)
        noise = torch.randn((batch, *latents.shape[1:]), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents[index] + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=context).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        value = loss.item()
        smooth = value if smooth is None else 0.98 * smooth + 0.02 * value
        if step % 200 == 0 or step == steps:
            _log("teacher", step, steps, started, loss=smooth)
        if step % 1000 == 0 and step < steps:  # a usable teacher at every stage of a long run
            _save_teacher(out, unet, text_encoder, tokenizer, scheduler)
    _save_teacher(out, unet, text_encoder, tokenizer, scheduler)
    report = {"steps": steps, "seed": seed, "batch": batch, "lr": lr, "renders": renders,
              "resumed": resume,
              "caption_drop": caption_drop, "held_out_combinations": [list(k) for k in HELD_OUT],
              "seconds": round(time.perf_counter() - started, 1)}
    (out / "unet" / "training.json").write_text(json.dumps(report, indent=2))
    return report


def _save_teacher(out: Path, unet, text_encoder, tokenizer, scheduler) -> None:
    text = copy.deepcopy(text_encoder)
    _zero_unused_tokens(text, tokenizer)
    _save_half(unet, out / "unet")
    _save_half(text, out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")


def _save_half(model: torch.nn.Module, folder: Path) -> None:
    """Save in float16 (half the bytes in the repository); the presets load float32."""
    copy.deepcopy(model).half().save_pretrained(folder)


@torch.no_grad()
def _zero_unused_tokens(text_encoder, tokenizer) -> None:
    """Zero the embeddings of tokens no shapes caption contains: they never trained (weight decay
    only shrank their random init), and zeros cost almost nothing in a compressed repository."""
    rng = np.random.default_rng(0)
    used: set[int] = set()
    for _ in range(20000):
        used.update(tokenizer(world.caption(world.sample_attributes(rng), rng)).input_ids)
    used.update(tokenizer("").input_ids)
    table = text_encoder.get_input_embeddings().weight
    keep = torch.zeros(table.shape[0], dtype=torch.bool)
    keep[sorted(used)] = True
    table[~keep] = 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["readout", "vae", "teacher", "dino"])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (teacher)")
    parser.add_argument("--resume", action="store_true",
                        help="teacher: continue from the weights saved in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"readout": (3000, 128), "vae": (4000, 32), "teacher": (8000, 128),
                "dino": (5000, 128)}[args.what]
    steps, batch = args.steps or defaults[0], args.batch or defaults[1]

    fn = {"readout": train_readout, "vae": train_vae, "teacher": train_teacher,
          "dino": train_dino}[args.what]
    extra = {}
    if args.what == "teacher":
        extra = {"resume": args.resume, **({"lr": args.lr} if args.lr else {})}
    report = fn(args.out, steps, args.seed, batch=batch, **extra)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
