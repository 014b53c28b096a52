"""Sampling events: what ``sampler.sample`` and ``M2MPipeline.__call__`` / ``generate`` tell a
``callback`` while they run, and how it stops them.

    def show(event):
        if isinstance(event, StepEvent):
            bar.update(1)                                   # event.step of event.num_steps
        elif isinstance(event, ImageEvent):
            gallery.extend(event.images or [])              # image event.image of each set
            if cancelled:
                return STOP                                 # the images so far are returned

    images = pipe(photos, num_images=4, callback=show)

The callback is called after every denoising step (``StepEvent``) and after every finished image
(``ImageEvent``), in order: for each image k = 0 .. M-1 its steps 0 .. steps-1, then its image.
It returns None to go on or ``STOP`` to end sampling: a stop at a step drops the image being
denoised, a stop at an image keeps it; the call returns the M' ≤ M images finished by then (the
same latents as the first M' images of a run that did not stop; the same pixels too with
``vae_batch_size=1``, since M2M-Self's returned images are decoded in chunks of that size). Any other return value is a
``TypeError`` (a diffusers ``callback_on_step_end`` returns a dict of tensors; this is not that
API). Rows of the tensors are the sets being sampled together: ``sets`` gives their positions in
the caller's list (``M2MPipeline.generate``'s ``image_sets``; the sampler's batch rows) and
``set_ids`` the ids their noise was seeded from (pipeline only; None for the sampler or explicit
generators).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    import torch
    from PIL import Image


class Signal(enum.Enum):
    STOP = "stop"


STOP = Signal.STOP
"""Return it from a callback to end sampling with the images finished so far."""


@dataclass(frozen=True)
class StepEvent:
    """After denoising step ``step`` (0-based) of ``num_steps`` of image ``image`` (k, 0-based) of
    ``num_images`` (M). ``latents``: the current latents ``[B, 4, h, w]`` (float32, after the
    scheduler step at ``timestep``)."""

    image: int
    num_images: int
    step: int
    num_steps: int
    timestep: int
    latents: "torch.Tensor"
    sets: tuple[int, ...]
    set_ids: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImageEvent:
    """Image ``image`` (k, 0-based) of ``num_images`` (M) is finished for every set of the batch.
    ``latents`` ``[B, 4, h, w]`` (float32); ``pixels`` ``[B, 3, H, W]`` in [0, 1]: the sampler
    gives them when it decodes in the loop (M2M-DINO) and None otherwise, the pipeline always
    (decoding the image alone: with ``vae_batch_size`` > 1 the returned images are decoded in
    chunks and may differ from these in the last float bits); ``images``: one RGB PIL image per
    set (pipeline only)."""

    image: int
    num_images: int
    latents: "torch.Tensor"
    pixels: "torch.Tensor | None"
    sets: tuple[int, ...]
    set_ids: tuple[str, ...] | None = None
    images: "list[Image.Image] | None" = None


Event = Union[StepEvent, ImageEvent]
Callback = Callable[[Event], "Signal | None"]


def wants_stop(result: object, event: Event) -> bool:
    """A callback's return value → stop or not; refuses anything but None and ``STOP``."""
    if result is None:
        return False
    if result is STOP:
        return True
    raise TypeError(f"the sampling callback returned {result!r} for {type(event).__name__} "
                    f"(image {event.image}); return None to go on or "
                    "m2m_ray.sampling.callbacks.STOP to stop")
