"""Every random stream of the project, named in one table.

A stream is keyed by a salt, so that two streams drawn from the same user seed never share draws:
numpy's ``SeedSequence([seed, ..., salt])`` / ``default_rng([seed, ..., salt])`` for the
data-order streams, ``seed + salt`` for a module's fresh weights or a toy world's draws. Exact
resume rests on it: every draw of a training run is a pure function of (seed, epoch or step,
rank, salt), so a resumed run draws what the uninterrupted one drew, and no stream moves when
another one is added. The values are the ones every published dataset, model and table was made
with; changing one changes those bytes. Hash-derived streams (no salt) are listed in
``HASHED_STREAMS`` for the audit.
"""

from __future__ import annotations


class Salt:
    """The salt of each stream (an int), with where it is drawn. A plain namespace, not an enum:
    streams of different kinds may share a value (their keys differ), and an enum would make one
    the alias of the other."""

    # --- training data and generation inputs: SeedSequence / default_rng key parts ------------
    SHARD_ORDER = 0x5EED            # data/training.py: a worker's shard order per epoch
    INGEST_ORDER = 0x5B5E75         # train/ingest.py: the whole shards of a training subset
    SET_SELECTION = 0x5E1EC7        # data/sets.py: which MIS sets a generate job picks
    STEP_NOISE = 0xE95              # train/step.py: one step's noise, timesteps, context drops

    # --- fresh weights: torch.manual_seed(model.seed + salt) -----------------------------------
    VAE_INIT = 1                    # models/presets.py: a preset's VAE without shipped weights
    TEXT_ENCODER_INIT = 2           # models/presets.py: its CLIP text encoder
    DINO_INIT = 3                   # models/presets.py: its DINO encoder
    IMAGE_SET_ATTENTION_INIT = 7    # models/m2m_unet.py: the M2M modules new to the base UNet
    TASK_EMBEDDER_INIT = 11         # models/m2m_unet.py: task embedders added for fine-tuning
    TINY_CLIP_INIT = 1              # eval/extractors.py: the tiny preset's CLIP (its own seed)
    TINY_DINO_INIT = 2              # eval/extractors.py: the tiny preset's DINO (its own seed)

    # --- the shapes world's toy training and its experiments: seed + salt --------------------
    TEACHER_INIT = 17               # shapes/train.py: the text-to-image teacher
    VAE_TRAINING_SAMPLES = 7        # shapes/train.py: the renders that check the VAE in training
    HELD_OUT_EVAL = 1000            # shapes/train.py, shapes/dino.py: held-out checks, probes
    RENDERER_SEEN = 1               # fidelity/method.py: rendered sets of trained combinations
    RENDERER_HELD_OUT = 2           # fidelity/method.py: rendered sets of held-out combinations
    RENDERER_DIVERSITY = 1          # fidelity/scoring.py: the renderer's own diversity reference
    CONTEXT_DROPPED = 10_000        # fidelity/method.py: the no-context draws (base rate)
    TEACHER_IMAGES = 20_000         # fidelity/method.py: the teacher's images for rendered sets


# Streams derived by hashing (their inputs are their domain): the function and its inputs.
HASHED_STREAMS = {
    "MIS image noise": "formats/ids.py image_seed: blake2b(caption_id, index, base_seed)",
    "a generated set's noise": "sampling/sampler.py set_seed: blake2b(f'{seed}:{set_id}')",
    "a training set's choice of N of 25": "data/training.py: default_rng([seed, epoch, caption_id])",
    "a set's Inception-Score split": "eval/job.py is_split_of: blake2b(set_id)",
}
