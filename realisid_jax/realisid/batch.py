"""Batched sampling of many requests: images of different prompts, persons, seeds and guidance scales share one
device batch, split over the data axes of the pipeline's mesh (every device of every process).

A request's images are grouped with others of the same compiled shape (``GroupKey``: size, person bucket,
steps, scheduler); everything else is data, so each group compiles once (``BatchSampler.compile``). Image ``j``
of a request is ``RealisIDPipeline.__call__``'s image ``j`` for the same request: its initial noise is row ``j``
of ``jax.random.normal(key(seed), (num_images, h, w, C))``, whatever the batch, the device count or the process
count, so a PNG record re-runs with ``realisid sample --from-png``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from realisid_jax.realisid.conditions import Person, PersonConditions
from realisid_jax.realisid.pipeline import (Guidance, RealisIDPipeline, _decode, guided_noise_pred, id_start_step,
                                            initial_noise, micro_conditioning, person_bucket)
from realisid_jax.schedulers import get_scheduler
from realisid_jax.sharding import data_sharding


@dataclasses.dataclass(frozen=True, eq=False)
class SampleRequest:
    """One request: ``num_images`` images of ``prompt`` with ``persons``; settings as ``RealisIDPipeline.__call__``
    (``None``: the config's ``sampling`` default, filled in by ``with_defaults``).

    Attributes:
      id: the request's name, unique in a run (output files are ``<id>-<j>.png``).
      line: 1-based line of the request file (0 when built in code), for messages.
    """

    id: str
    prompt: str
    persons: tuple[Person, ...] = ()
    negative_prompt: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int | None = None
    scheduler: str | None = None
    text_guidance_scale: float | None = None
    id_guidance_scale: float | None = None
    id_start_fraction: float | None = None
    num_images: int = 1
    line: int = 0

    def with_defaults(self, sampling) -> SampleRequest:
        """Every ``None`` setting replaced by ``sampling``'s (a config's ``sampling`` section)."""
        fields = {"negative_prompt": sampling.negative_prompt, "seed": sampling.seed, "height": sampling.height,
                  "width": sampling.width, "num_inference_steps": sampling.num_inference_steps,
                  "scheduler": sampling.scheduler, "text_guidance_scale": sampling.text_guidance_scale,
                  "id_guidance_scale": sampling.id_guidance_scale, "id_start_fraction": sampling.id_start_fraction}
        return dataclasses.replace(self, **{k: v for k, v in fields.items() if getattr(self, k) is None})

    def image_name(self, index: int) -> str:
        return f"{self.id}-{index}"


@dataclasses.dataclass(frozen=True)
class GroupKey:
    """What a compiled program depends on: output size, person slots (``person_bucket``), steps, scheduler."""

    height: int
    width: int
    slots: int
    steps: int
    scheduler: str

    def __str__(self) -> str:
        return f"{self.width}x{self.height}/{self.slots}p/{self.steps} steps/{self.scheduler}"


def group_key(request: SampleRequest, max_persons: int) -> GroupKey:
    """The group of a request whose settings are filled in (``SampleRequest.with_defaults``)."""
    slots = person_bucket(max(1, len(request.persons)), max_persons)
    return GroupKey(request.height, request.width, slots, request.num_inference_steps, request.scheduler)


@dataclasses.dataclass(frozen=True)
class Row:
    """One image of a batch: image ``index`` of ``request``, whose persons are prepared as ``conditions``."""

    request: SampleRequest
    conditions: PersonConditions
    index: int


@struct.dataclass
class BatchInputs:
    """One device batch of B images with K person slots (B split over the mesh's data axes).

    Attributes:
      latents: (B, h, w, C) float32 initial noise (before ``init_noise_sigma``).
      text: ``(prompt_embeds, negative_embeds, pooled, negative_pooled)``, (B, 77, D) and (B, P) (pooled ``None``
        for SD 1.5).
      time_ids: (B, 6) float32 ``(H, W, 0, 0, H, W)``.
      reference_pixels: (B, K, S, S, 3) float32 CLIP inputs; boxes: (B, K, 4); valid: (B, K) bool;
      landmark_images: (B, K, P, P, 3) float32.
      text_scale, id_scale: (B,) float32 λ_t, λ_i; id_start_step: (B,) int32 first step with the ID.
    """

    latents: jax.Array
    text: tuple
    time_ids: jax.Array
    reference_pixels: jax.Array
    boxes: jax.Array
    valid: jax.Array
    landmark_images: jax.Array
    text_scale: jax.Array
    id_scale: jax.Array
    id_start_step: jax.Array


class BatchSampler:
    """Runs batches of ``Row``s of one group through a ``RealisIDPipeline``'s models on its mesh.

    Args:
      pipeline: the models, tokenizers, config and mesh (``None``: one device).
      batch_size: images per device batch; a multiple of the mesh's batch shards, or the batch would be
        replicated instead of split (``check_batch_size``).
    """

    def __init__(self, pipeline: RealisIDPipeline, batch_size: int):
        self.pipeline = pipeline
        self.batch_size = batch_size
        self._compiled: dict[GroupKey, object] = {}
        self.compile_seconds: dict[GroupKey, float] = {}
        self._base_scheduler = dataclasses.asdict(pipeline.scheduler)  # the base model's scheduler config

    # ----------------------------------------------------------------------------------------------- host
    @functools.lru_cache(maxsize=256)
    def _text(self, prompt: str, negative_prompt: str | None):
        """The four text arrays of one prompt pair as host arrays, (1, 77, D) / (1, P)."""
        text = self.pipeline.encode_prompt(prompt, negative_prompt or None, 1)
        return tuple(None if x is None else np.asarray(x) for x in text)

    @functools.lru_cache(maxsize=64)
    def _noise(self, seed: int, num_images: int, latent_shape: tuple[int, ...]) -> np.ndarray:
        return np.asarray(initial_noise(seed, (num_images, *latent_shape)))

    def host_inputs(self, key: GroupKey, rows: Sequence[Row]) -> BatchInputs:
        """The numpy ``BatchInputs`` of ``rows`` (at most ``batch_size``; the rest is padded with copies of the
        last row, whose images are dropped).

        Raises:
          ValueError: more rows than ``batch_size``, or none.
        """
        if not 0 < len(rows) <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} rows, got {len(rows)}")
        rows = list(rows) + [rows[-1]] * (self.batch_size - len(rows))
        latent_shape = self.pipeline.latent_shape(key.height, key.width)
        latents, texts, pixels, boxes, valid, marks, scales = [], [], [], [], [], [], []
        for row in rows:
            r, c, k = row.request, row.conditions, key.slots
            latents.append(self._noise(r.seed, r.num_images, latent_shape)[row.index])
            texts.append(self._text(r.prompt, r.negative_prompt))
            pixels.append(c.reference_pixels[:k])
            boxes.append(c.boxes[:k])
            valid.append(c.valid[:k])
            marks.append(c.landmark_images[:k])
            start = id_start_step(r.id_start_fraction, key.steps)
            scales.append((r.text_guidance_scale, r.id_guidance_scale, start))
        text = tuple(None if parts[0] is None else np.concatenate(parts) for parts in zip(*texts))
        scales = np.asarray(scales, np.float64)
        return BatchInputs(np.stack(latents), text, micro_conditioning(key.height, key.width, len(rows)),
                           np.stack(pixels), np.stack(boxes), np.stack(valid), np.stack(marks),
                           scales[:, 0].astype(np.float32), scales[:, 1].astype(np.float32),
                           scales[:, 2].astype(np.int32))

    def place(self, host: BatchInputs) -> BatchInputs:
        """``host`` on the mesh, every array split on its leading (batch) axis. Every process passes the same
        whole batch and keeps the rows of its own devices (``jax.make_array_from_callback``), so this works
        across processes."""
        pipeline = self.pipeline
        if pipeline.mesh is None:
            return jax.tree.map(jnp.asarray, host)

        def put(x):
            x = np.asarray(x)
            sharding = data_sharding(pipeline.mesh, x.shape, pipeline.rules)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(put, host)

    # --------------------------------------------------------------------------------------------- device
    def scheduler(self, key: GroupKey):
        return get_scheduler(key.scheduler, self._base_scheduler)

    def compile(self, key: GroupKey, inputs: BatchInputs):
        """The group's executable (compiled on its first batch, timed in ``compile_seconds``)."""
        if key not in self._compiled:
            scheduler = self.scheduler(key)
            sched_state = scheduler.set_timesteps(key.steps)
            start = time.perf_counter()
            with self.pipeline._mesh_context():
                executable = compile_group(self.pipeline._graphdef, scheduler, self.pipeline._state, sched_state,
                                           inputs)
            self.compile_seconds[key] = time.perf_counter() - start
            self._compiled[key] = (executable, sched_state)
        return self._compiled[key]

    def run(self, key: GroupKey, host: BatchInputs) -> jax.Array:
        """The (batch_size, H, W, 3) uint8 images of a batch of ``host_inputs(key, rows)`` (a global array split
        like the batch; rows past ``len(rows)`` are padding). Dispatched asynchronously: reading the array waits
        for the devices."""
        inputs = self.place(host)
        executable, sched_state = self.compile(key, inputs)
        with self.pipeline._mesh_context():
            return executable(self.pipeline._state, sched_state, inputs)


def compile_group(graphdef, scheduler, state, sched_state, inputs: BatchInputs):
    """``_sample`` compiled ahead of time for ``inputs``' shapes and shardings (one call per group)."""
    return _sample.lower(graphdef, scheduler, state, sched_state, inputs).compile()


@functools.partial(jax.jit, static_argnames=("graphdef", "scheduler"))
def _sample(graphdef, scheduler, state, sched_state, inputs: BatchInputs):
    """ID encoding, the guided denoising loop (paper Eq. 8, as ``pipeline._denoise`` with per-image persons and
    scales) and the VAE decode of one batch: (B, H, W, 3) uint8."""
    models = nnx.merge(graphdef, state)
    b, k = inputs.reference_pixels.shape[:2]
    hidden = models.image_encoder(inputs.reference_pixels.reshape(b * k, *inputs.reference_pixels.shape[2:]))
    features = hidden.hidden_states[-2].reshape(b, k, *hidden.hidden_states[-2].shape[1:])
    encode_id = models.realisid.encode_id
    id_embedding, no_id = encode_id(features), encode_id(jnp.zeros_like(features))  # (B, K, T, D)
    persons = (inputs.boxes, inputs.valid, inputs.landmark_images)
    per_image = lambda x: x.reshape(b, 1, 1, 1)  # noqa: E731 - (B,) values against (B, h, w, C)
    guidance = Guidance(per_image(inputs.text_scale), per_image(inputs.id_scale))

    def body(with_id):
        def step(i, carry):
            x, scheduler_carry = carry
            x_in = scheduler.scale_model_input(sched_state, x, i)
            # Per image: an image whose ID starts later than the batch's first keeps "no ID" until then.
            ids = (no_id, jnp.where(per_image(i >= inputs.id_start_step), id_embedding, no_id) if with_id else None)
            eps = guided_noise_pred(models, x_in, sched_state.timesteps[i], ids, persons, inputs.text,
                                    inputs.time_ids, guidance)
            return scheduler.step(sched_state, eps.astype(x.dtype), i, x, scheduler_carry)
        return step

    latents = inputs.latents * sched_state.init_noise_sigma
    carry = (latents, scheduler.init_carry(sched_state, latents))
    # Delayed ID: until the batch's earliest ID start no image has its ID, two predictions per step (ε_t&i = ε_t).
    first = jnp.min(inputs.id_start_step)
    carry = jax.lax.fori_loop(0, first, body(False), carry)
    latents, _ = jax.lax.fori_loop(first, sched_state.timesteps.shape[0], body(True), carry)
    return _decode(graphdef, state, latents)
