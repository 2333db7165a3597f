"""``RealisIDPipeline``: identity-customised sampling on SDXL (or SD 1.5) with both RealisID branches.

Per step (paper Eq. 8) three noise predictions share one batch: ε_none (negative prompt, no ID), ε_t
(text, no ID) and ε_t&i (text and ID); ``ε = ε_none + λ_t (ε_t − ε_none) + λ_i (ε_t&i − ε_t)``. "No ID" is
zero image features through the ID projection. "No text" (an empty negative prompt) is what training's text
dropout used, ``config.realisid.no_text``: by default the encoded empty prompt, since the trained branches never
saw anything else; ``"zeros"`` gives diffusers' SDXL default instead (all-zero prompt and pooled embeddings,
``force_zeros_for_empty_prompt``), for parity with diffusers' pipelines. Delayed subject conditioning turns the
ID off (ε_t&i = ε_t) for the first ``id_start_fraction`` of the steps: those steps run two predictions, not
three. Each phase of the denoising loop is one ``jax.jit`` (``lax.fori_loop``); seeds, prompts, boxes and
guidance scales are data, so none of them recompiles; the persons are cut to a bucket of 1, 2, 4, ... slots
(``person_bucket``), one executable per bucket. The branches are stored in ``config.sampling.param_dtype``
(default the compute dtype: bf16 on accelerators), cast once when the pipeline is built.
Mirrors diffusers' ``StableDiffusionXLPipeline.__call__`` (timesteps, latents, added time ids).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh
from tqdm.auto import tqdm

from realisid_jax.loading.lora import merge_loras
from realisid_jax.loading.pipeline_folder import load_pipeline_folder
from realisid_jax.models.registry import FROZEN, dtypes
from realisid_jax.realisid.branches import RealisIDConfig, branches_class
from realisid_jax.realisid.components import (
    Components,
    apply_kernel_config,
    base_kind,
    base_scheduler_config,
    base_tokenizers,
    load_base,
    load_branches,
    random_components,
)
from realisid_jax.realisid.conditions import Person, PersonConditions, SizeError, prepare_persons
from realisid_jax.face.analysis import FaceAnalyzer
from realisid_jax.face.plain_background import PlainBackgroundAnalyzer
from realisid_jax.models.vae import VAE_SCALE_FACTOR
from realisid_jax.text.prompt_encoding import encode_prompt_sd15, encode_prompt_sdxl, no_text_setting
from realisid_jax.text.tokenizer import offline_clip_tokenizer
from realisid_jax.schedulers import get_scheduler
from realisid_jax.sharding import DEFAULT_RULES, active_batch_shards, data_sharding, state_shardings, use_mesh

@dataclasses.dataclass(frozen=True, eq=False)
class SamplingOutput:
    """images: (N, H, W, 3) uint8; latents: (N, H/8, W/8, C) final latents; conditions: the host conditions."""

    images: np.ndarray
    latents: np.ndarray
    conditions: PersonConditions


@struct.dataclass
class Guidance:
    """Paper Eq. 8's scales, traced (changing them does not recompile): ``text_scale`` λ_t and ``id_scale`` λ_i,
    float32 scalars or (N, 1, 1, 1) per image."""

    text_scale: jax.Array
    id_scale: jax.Array


@struct.dataclass
class DenoiseInputs:
    """What the denoising steps of one request read, placed on the mesh (N images, K person slots).

    Attributes:
      text: ``(prompt_embeds, negative_embeds, pooled, negative_pooled)``, (N, 77, D) and (N, P) (pooled
        ``None`` for SD 1.5).
      time_ids: (N, 6) SDXL micro-conditioning ``(H, W, 0, 0, H, W)``.
      id_embedding, no_id: (K, T, D) p_id of each person and of "no ID" (zero image features).
      boxes: (N, K, 4) normalised ``(x0, y0, x1, y1)``; valid: (N, K) bool; landmark_images: (N, K, P, P, 3).
    """

    text: tuple
    time_ids: jax.Array
    id_embedding: jax.Array
    no_id: jax.Array
    boxes: jax.Array
    valid: jax.Array
    landmark_images: jax.Array


def prepare_conditions(config, persons: Sequence[Person], height: int, width: int,
                       analyzer: FaceAnalyzer | None = None) -> PersonConditions:
    """Checks the output size and the persons, analyses their photos (host only, no model needed).

    Raises:
      SizeError: height/width not positive multiples of 8 latent cells (64 px).
      BoxError, TooManyPersonsError, NoFaceError, ImageReadError, FaceTooSmallError: see
      ``conditioning.prepare_persons``.
    """
    step = 8 * VAE_SCALE_FACTOR
    if height % step or width % step or height <= 0 or width <= 0:
        raise SizeError(f"height and width must be positive multiples of {step} px (8 latent cells), "
                        f"got {height}x{width}")
    return prepare_persons(persons, height=height, width=width, max_persons=config.realisid.max_persons,
                           landmark_px=VAE_SCALE_FACTOR * config.realisid.local_latent_size,
                           analyzer=analyzer or reference_analyzer(config),
                           clip_size=config.model.image_encoder["image_size"],
                           landmark_layout=config.realisid.get("landmark_layout", "face_mesh"))


def reference_analyzer(config):
    """The reference analysis ``config.realisid.reference_analysis`` names: ``"face"`` (``FaceAnalyzer``: detection,
    Face Mesh, parsing) or ``"plain_background"`` (``PlainBackgroundAnalyzer``: a subject on a plain background,
    the glyph world's).

    Raises:
      ValueError: another name.
    """
    kind = config.realisid.get("reference_analysis", "face")
    if kind == "face":
        return FaceAnalyzer()
    if kind == "plain_background":
        return PlainBackgroundAnalyzer()
    raise ValueError(f"config.realisid.reference_analysis must be 'face' or 'plain_background', got {kind!r}")


class RealisIDPipeline:
    """Sampling with RealisID's local and global branches on a frozen base model.

    Args:
      components: the ``Components`` container (frozen base + ``realisid`` branches); split once here.
      tokenizers: one ``CLIPTokenizer`` per text encoder.
      config: the project config (``sampling`` and ``realisid`` sections are the defaults).
      scheduler_config: the base model's ``scheduler_config.json`` contents (default SDXL's).
      mesh: optional device mesh; parameters are placed on their logical-axis shardings and the batch is
        split over the data axes. Same seed, same images, whatever the mesh.
      analyzer: face analysis for the reference / pose photos (default ``FaceAnalyzer()``).
    """

    def __init__(self, components: Components, tokenizers: Sequence, config, *, scheduler_config: dict | None = None,
                 mesh: Mesh | None = None, analyzer: FaceAnalyzer | None = None):
        apply_kernel_config(components, config)
        graphdef, state = nnx.split(components)
        self._init(graphdef, state, tokenizers, config, scheduler_config=scheduler_config, mesh=mesh,
                   analyzer=analyzer)

    @classmethod
    def from_split(cls, graphdef: nnx.GraphDef, state: nnx.State, tokenizers: Sequence, config, *,
                   scheduler_config: dict | None = None, mesh: Mesh | None = None,
                   analyzer: FaceAnalyzer | None = None) -> RealisIDPipeline:
        """A pipeline over an already split ``Components`` (``nnx.split``): the trainer's, without a merge."""
        pipeline = cls.__new__(cls)
        pipeline._init(graphdef, state, tokenizers, config, scheduler_config=scheduler_config, mesh=mesh,
                       analyzer=analyzer)
        return pipeline

    def _init(self, graphdef, state, tokenizers, config, *, scheduler_config, mesh, analyzer) -> None:
        self.config = config
        self.tokenizers = tuple(tokenizers)
        self.is_sdxl = len(self.tokenizers) == 2
        self.scheduler = get_scheduler(config.sampling.scheduler, scheduler_config)
        self.mesh = mesh
        self.rules = tuple(config.mesh.rules) if mesh is not None else DEFAULT_RULES
        self.analyzer = analyzer
        state = cast_branches(state, config.sampling.get("param_dtype") or config.dtype)
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh, self.rules))
        self._graphdef, self._state = graphdef, state

    @property
    def components(self) -> Components:
        """The models (a fresh merge of the pipeline's state)."""
        return nnx.merge(self._graphdef, self._state)

    @classmethod
    def from_config(cls, config, *, seed: int = 0, mesh: Mesh | None = None,
                    analyzer: FaceAnalyzer | None = None) -> RealisIDPipeline:
        """Randomly initialised models (``components.random_components``) with the offline CLIP tokenizer: the
        embedded default and the tests. Random weights make noise, not faces."""
        tokenizer = offline_clip_tokenizer()
        n_text = 2 if config.model.get("text_encoder_2") is not None else 1
        return cls(random_components(config, seed), (tokenizer,) * n_text, config, mesh=mesh, analyzer=analyzer)

    @classmethod
    def from_pretrained(cls, config, base: str, *, branches: str | None = None, image_encoder: str | None = None,
                        variant: str | None = None, mesh: Mesh | None = None,
                        analyzer: FaceAnalyzer | None = None) -> RealisIDPipeline:
        """Real weights from local folders.

        Args:
          base: a diffusers SDXL / SD 1.5 pipeline folder (``model_index.json``, ``unet/``, ``vae/``, ...), a
            Stability single ``.safetensors`` file (the standard tokenizers and scheduler) or a ``realisid
            convert`` cache (its source's; ``components.load_base``).
          branches: trained RealisID weights (``local_branch/``, ``global_branch/``, ``id_projection/``, as
            ``realisid export`` writes them); default: fresh branches from the UNet (zero residuals).
          image_encoder: a transformers ``CLIPVisionModelWithProjection`` folder; default the base folder's
            ``image_encoder/``.
          variant: weights variant (``"fp16"``: ``model.fp16.safetensors``); default the plain files, or each
            folder's only variant. Shards (``*.index.json``) and ``.bin`` files load too.

        Raises:
          FileNotFoundError / HubIdError / CheckpointMismatchError: from the loaders, naming the folder.
        """
        kw = dtypes(config)
        rules = tuple(config.mesh.rules)
        if base_kind(base) == "folder":  # the classes follow model_index.json, as in diffusers
            parts = load_pipeline_folder(base, dtype=kw["dtype"], mesh=mesh, rules=rules, image_encoder=image_encoder,
                                         variant=variant, attention_impl=kw["attention_impl"])
            if parts.image_encoder is None:
                raise FileNotFoundError(f"no image encoder: {base} has no image_encoder/ and --image-encoder was not "
                                        f"given")
            models, tokenizers, scheduler_config = parts.models(), parts.tokenizers, parts.scheduler_config
        else:
            models = load_base(base, config, image_encoder=image_encoder, mesh=mesh, rules=rules)
            tokenizers, scheduler_config = base_tokenizers(base, config), base_scheduler_config(base)
        realisid = branches_class(config).from_unet(models["unet"], RealisIDConfig.from_config(config))
        if branches is not None:
            realisid = load_branches(branches, realisid=realisid, mesh=mesh, rules=rules, **kw)
        components = Components(**{name: models.get(name) for name in FROZEN}, realisid=realisid)
        return cls(components, tokenizers, config, scheduler_config=scheduler_config, mesh=mesh, analyzer=analyzer)

    def load_lora(self, path, scale: float = 1.0) -> dict[str, int]:
        """Merges a LoRA file into the frozen UNet and text encoders once (diffusers' ``load_lora_weights`` then
        ``fuse_lora(lora_scale=scale)``; ``loading.lora``): no per-step cost, the compiled loop is reused; the
        RealisID branches are left as they are. Call it again to stack LoRAs.

        Returns:
          component -> number of modules updated.

        Raises:
          FileNotFoundError, ValueError, LoraError: an unreadable file, or keys / shapes that do not fit (all
          listed); nothing is merged then.
        """
        components = self.components
        counts = merge_loras(components.named(), [(path, scale)])[0]
        self._state = nnx.state(components)
        return dict(counts)

    def set_branch_params(self, params: dict) -> None:
        """Replaces the branches' weights with ``params``, a pure dict of the ``realisid`` module's parameters
        (a train state's ``params``, any float dtype), cast and placed like the current ones: samples from a run
        in progress, no recompilation.

        Raises:
          ValueError: ``params`` does not have the branches' tree structure.
        """
        state = self._state["realisid"]
        expected = jax.tree.map(lambda x: x.shape, state.to_pure_dict())
        if jax.tree.map(lambda x: x.shape, params) != expected:
            raise ValueError("params do not match the RealisID branches' tree (names, shapes)")
        new = jax.tree.map(lambda x: x, state)
        new.replace_by_pure_dict(jax.tree.map(lambda x, old: x.astype(old.dtype), params, state.to_pure_dict()))
        self._state["realisid"] = jax.device_put(new, jax.tree.map(lambda x: x.sharding, state))

    # ----------------------------------------------------------------------------------------------- host
    def prepare(self, persons: Sequence[Person], height: int, width: int) -> PersonConditions:
        """``prepare_conditions`` with this pipeline's config and reference analyser (``reference_analyzer``)."""
        if self.analyzer is None:
            self.analyzer = reference_analyzer(self.config)
        return prepare_conditions(self.config, persons, height, width, self.analyzer)

    def encode_prompt(self, prompt: str | Sequence[str], negative_prompt: str | None, num_images: int):
        """(text, negative text, pooled, negative pooled): each repeated to the ``num_images`` batch; the
        pooled pair is ``None`` for SD 1.5. An empty or ``None`` negative prompt is "no text" as
        ``config.realisid.no_text`` defines it (the encoded ``""``, or zeros)."""
        text_encoders = self.components.text_encoders
        zeros = no_text_setting(self.config) == "zeros"
        if self.is_sdxl:
            e = encode_prompt_sdxl(prompt, self.tokenizers, text_encoders, negative_prompt=negative_prompt or None,
                                   force_zeros_for_empty_prompt=zeros, num_images_per_prompt=num_images)
            return e.prompt_embeds, e.negative_prompt_embeds, e.pooled_prompt_embeds, e.negative_pooled_prompt_embeds
        text, negative = encode_prompt_sd15(prompt, self.tokenizers[0], text_encoders[0],
                                            negative_prompt=negative_prompt, num_images_per_prompt=num_images)
        return text, jnp.zeros_like(negative) if zeros and not negative_prompt else negative, None, None

    # --------------------------------------------------------------------------------------------- device
    def __call__(self, prompt: str, persons: Sequence[Person] | PersonConditions, *, negative_prompt: str | None = None,
                 height: int | None = None, width: int | None = None, num_inference_steps: int | None = None,
                 text_guidance_scale: float | None = None, id_guidance_scale: float | None = None,
                 id_start_fraction: float | None = None, num_images: int = 1, seed: int = 0,
                 latents: np.ndarray | None = None, progress: bool = True) -> SamplingOutput:
        """Generates ``num_images`` images of ``prompt`` with the given persons.

        Defaults come from ``config.sampling`` (paper: 30 DDIM steps, λ_t = 7.5, λ_i = 5.0, ID from 20% of
        the steps on). ``persons`` may be empty (then the branches see no valid person and add nothing), or
        already prepared by ``prepare_conditions``.
        ``latents`` (num_images, height/8, width/8, C) replaces the seed's initial noise (diffusers' argument;
        scaled by the scheduler's ``init_noise_sigma`` as there).

        Returns:
          ``SamplingOutput`` with (num_images, height, width, 3) uint8 images.

        Raises:
          SizeError, BoxError, TooManyPersonsError, and the face-analysis errors, before any device work.
        """
        s = self.config.sampling
        height, width = height or s.height, width or s.width
        steps = num_inference_steps or s.num_inference_steps
        conditions = persons if isinstance(persons, PersonConditions) else self.prepare(persons, height, width)
        sched_state = self.scheduler.set_timesteps(steps)
        fraction = s.id_start_fraction if id_start_fraction is None else id_start_fraction
        guidance = Guidance(
            jnp.float32(s.text_guidance_scale if text_guidance_scale is None else text_guidance_scale),
            jnp.float32(s.id_guidance_scale if id_guidance_scale is None else id_guidance_scale))
        text = self.encode_prompt(prompt, negative_prompt if negative_prompt is not None else s.negative_prompt or None,
                                  num_images)
        latent_shape = (num_images, *self.latent_shape(height, width))
        if latents is None:
            latents = initial_noise(seed, latent_shape)
        elif tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {latent_shape}")
        latents = jnp.asarray(latents, jnp.float32) * sched_state.init_noise_sigma
        time_ids = micro_conditioning(height, width, num_images)
        with self._mesh_context():
            inputs = self._place(dict(latents=latents, text=text, time_ids=time_ids, conditions=conditions,
                                      num_images=num_images))
            id_embedding, no_id = _encode_ids(self._graphdef, self._state, inputs["reference_pixels"])
            request = DenoiseInputs(inputs["text"], inputs["time_ids"], id_embedding, no_id, inputs["boxes"],
                                    inputs["valid"], inputs["landmark_images"])
            carry = (inputs["latents"], self.scheduler.init_carry(sched_state, inputs["latents"]))
            latents = denoise(self._graphdef, self.scheduler, self._state, sched_state, carry, request, guidance,
                              id_start_step(fraction, steps), progress=progress)[0]
            images = _decode(self._graphdef, self._state, latents)
        return SamplingOutput(np.asarray(images), np.asarray(latents), conditions)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(height/8, width/8, C): one image's latent."""
        return height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR, self.config.model.unet["in_channels"]

    def _mesh_context(self):
        import contextlib

        return use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()

    def _place(self, host: dict) -> dict:
        """Batch arrays onto the data axes (replicated persons); identity without a mesh. The persons are cut
        to their ``person_bucket``, so the branches run on the slots the request uses."""
        c: PersonConditions = host["conditions"]
        slots = person_bucket(int(np.flatnonzero(c.valid).max(initial=-1)) + 1, len(c.valid))
        c = dataclasses.replace(c, reference_pixels=c.reference_pixels[:slots], boxes=c.boxes[:slots],
                                valid=c.valid[:slots], landmark_images=c.landmark_images[:slots])
        n = host["num_images"]
        text = tuple(x for x in host["text"])
        arrays = dict(latents=host["latents"], text=text, time_ids=jnp.asarray(host["time_ids"]),
                      reference_pixels=jnp.asarray(c.reference_pixels),
                      boxes=jnp.broadcast_to(jnp.asarray(c.boxes), (n, *c.boxes.shape)),
                      valid=jnp.broadcast_to(jnp.asarray(c.valid), (n, *c.valid.shape)),
                      landmark_images=jnp.broadcast_to(jnp.asarray(c.landmark_images), (n, *c.landmark_images.shape)))
        if self.mesh is None:
            return arrays
        batched = {k: v for k, v in arrays.items() if k != "reference_pixels"}
        placed = jax.tree.map(lambda x: jax.device_put(x, data_sharding(self.mesh, x.shape, self.rules)), batched)
        return {**placed, "reference_pixels": arrays["reference_pixels"]}


def initial_noise(seed: int, shape: tuple[int, ...]) -> jax.Array:
    """The initial noise of a request: ``(num_images, h, w, C)`` float32 standard normal from ``key(seed)``, image
    ``j`` row ``j`` (before ``init_noise_sigma``). ``sample`` and ``sample-batch`` both draw it here, so a PNG
    record re-runs with either."""
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def micro_conditioning(height: int, width: int, num_images: int) -> np.ndarray:
    """SDXL's ``time_ids`` of uncropped ``height`` x ``width`` images: (num_images, 6) float32
    ``(H, W, 0, 0, H, W)`` (original size, crop top-left, target size)."""
    return np.tile(np.array([[height, width, 0, 0, height, width]], np.float32), (num_images, 1))


def id_start_step(fraction: float, steps: int) -> int:
    """The first of ``steps`` denoising steps with the ID (paper's delayed ID conditioning: ε_t&i = ε_t before)."""
    return math.floor(fraction * steps)


def person_bucket(count: int, max_persons: int) -> int:
    """Person slots the branches run on for ``count`` persons: the next of 1, 2, 4, ... (at most
    ``max_persons``). Each bucket compiles once; a one-person request does not pay for ``max_persons``
    global and local ControlNet passes (at SDXL 1024² about 2x the step's FLOPs for K = 4)."""
    return min(max_persons, 1 << max(0, count - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _encode_ids(graphdef, state, reference_pixels):
    """p_id and the "no ID" embedding (zero image features through the projection), each (K, N, D)."""
    models = nnx.merge(graphdef, state)
    features = models.image_encoder(reference_pixels).hidden_states[-2]
    return models.realisid.encode_id(features), models.realisid.encode_id(jnp.zeros_like(features))


def cast_branches(state: nnx.State, dtype) -> nnx.State:
    """``state`` (arrays, or ``ShapeDtypeStruct`` for plans) with the RealisID branches' float weights in ``dtype``
    (once, at load: sampling reads them in the compute dtype, so the loop converts no weight); the other
    components as they are."""
    dtype = jnp.dtype(dtype)

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    if "realisid" not in state:  # a pipeline of the frozen models only (prompt encoding)
        return state
    return nnx.State({**state, "realisid": jax.tree.map(cast, state["realisid"])})


def denoise(graphdef, scheduler, state, sched_state, carry, inputs: DenoiseInputs, guidance: Guidance,
            id_start: int, *, progress: bool = False):
    """All ``len(sched_state.timesteps)`` guided steps: those before ``id_start`` with two predictions (delayed ID:
    ε_t&i = ε_t), the rest with three (``_denoise``'s two executables). Returns the advanced ``carry``.

    With ``progress`` a bar counts the steps, one call per step (a host callback inside the loop would keep the
    executable out of the persistent compilation cache); without, one call per phase."""
    steps = int(sched_state.timesteps.shape[0])
    id_start = min(max(int(id_start), 0), steps)
    edges = list(range(steps + 1)) if progress else sorted({0, id_start, steps})
    with tqdm(total=steps, desc="denoising", disable=not progress) as bar:
        for start, stop in zip(edges, edges[1:]):
            carry = _denoise(graphdef, scheduler, state, sched_state, carry, inputs, guidance, jnp.int32(start),
                             jnp.int32(stop), with_id=start >= id_start)
            if progress:
                carry[0].block_until_ready()
            bar.update(stop - start)
    return carry


@functools.partial(jax.jit, static_argnames=("graphdef", "scheduler", "with_id"))
def _denoise(graphdef, scheduler, state, sched_state, carry, inputs: DenoiseInputs, guidance: Guidance, start,
             stop, *, with_id: bool):
    """Guided denoising steps ``start`` to ``stop`` (paper Eq. 8): three predictions per step ``with_id``, else
    two (ε_none, ε_t: the steps before the ID starts).

    ``graphdef``/``state``: the split ``Components``; ``carry`` is (latents (N, h, w, C), the scheduler's loop
    carry) and is returned advanced; the bounds are traced, so the whole phase and a single step share one
    executable."""
    models = nnx.merge(graphdef, state)
    n = carry[0].shape[0]
    per_image = lambda x: jnp.broadcast_to(x, (n, *x.shape))  # noqa: E731 - persons are shared by the N images
    ids = (per_image(inputs.no_id), per_image(inputs.id_embedding) if with_id else None)
    persons = (inputs.boxes, inputs.valid, inputs.landmark_images)

    def body(i, carry):
        x, scheduler_carry = carry
        x_in = scheduler.scale_model_input(sched_state, x, i)
        eps = guided_noise_pred(models, x_in, sched_state.timesteps[i], ids, persons, inputs.text, inputs.time_ids,
                                guidance)
        return scheduler.step(sched_state, eps.astype(x.dtype), i, x, scheduler_carry)

    return jax.lax.fori_loop(start, stop, body, carry)


def guidance_text(text, time_ids, predictions: int):
    """The text context and SDXL added conditions of Eq. 8's predictions stacked on the batch axis: negative,
    prompt (ε_none, ε_t) and, for three ``predictions``, prompt again (ε_t&i).

    Args:
      text: ``(prompt_embeds (N, 77, D), negative_embeds, pooled (N, P) or None, negative_pooled)``.
      time_ids: (N, 6) SDXL micro-conditioning (unused for SD 1.5, whose ``pooled`` is None).

    Returns:
      ``(context (predictions*N, 77, D), added_cond_kwargs or None)``.
    """
    prompt_embeds, negative_embeds, pooled, negative_pooled = text
    context = jnp.concatenate([negative_embeds] + [prompt_embeds] * (predictions - 1))
    if pooled is None:
        return context, None
    return context, {"text_embeds": jnp.concatenate([negative_pooled] + [pooled] * (predictions - 1)),
                     "time_ids": jnp.tile(time_ids, (predictions, 1))}


def guided_noise_pred(models, x_in, t, ids, persons, text, time_ids, guidance: Guidance):
    """Paper Eq. 8: ε = ε_none + λ_t (ε_t - ε_none) + λ_i (ε_t&i - ε_t), the predictions as one batch.

    Without the persons' IDs (the steps before the ID starts, ε_t&i = ε_t) the λ_i term vanishes and two
    predictions are made. The branches see no text on SD 1.5 (no added conditions), so ε_none and ε_t share one
    branch pass there.

    Args:
      models: the merged ``Components`` (``unet`` and ``realisid`` used).
      x_in: (N, h, w, C) scaled model input; ``t`` the step's timestep.
      ids: ``(no_id, id_embedding or None)``, each (N, K, T, D) ID tokens; ``None``: two predictions.
      persons: boxes (N, K, 4), validity (N, K) and landmark images (N, K, P, P, 3).
      text, time_ids: as ``guidance_text``.
      guidance: λ_t and λ_i, scalars or broadcastable against (N, h, w, C).

    Returns:
      (N, h, w, C) guided noise prediction, in the UNet's dtype.
    """
    no_id, with_id = ids
    k = 2 if with_id is None else 3
    context, added = guidance_text(text, time_ids, k)
    shared = added is None  # SD 1.5: ε_none's and ε_t's branch inputs are equal
    p_id = [no_id] * (1 if shared else 2) + ([] if with_id is None else [with_id])
    m = len(p_id)
    x = jnp.concatenate([x_in] * m)
    down, mid = models.realisid.residuals(x, t, jnp.concatenate(p_id), *(jnp.concatenate([p] * m) for p in persons),
                                          added)
    if shared:  # the no-ID residuals serve ε_none and ε_t
        n = x_in.shape[0]
        down, mid = jax.tree.map(lambda r: jnp.concatenate([r[:n], r]), (down, mid))
    eps = models.unet(jnp.concatenate([x_in] * k), t, context, added_cond_kwargs=added,
                      down_block_additional_residuals=down, mid_block_additional_residual=mid)
    e_none, e_text = eps[:x_in.shape[0]], eps[x_in.shape[0]:2 * x_in.shape[0]]
    guided = e_none + guidance.text_scale * (e_text - e_none)
    if with_id is None:
        return guided
    return guided + guidance.id_scale * (eps[2 * x_in.shape[0]:] - e_text)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _decode(graphdef, state, latents):
    """Latents -> uint8 images, as diffusers' ``VaeImageProcessor.postprocess`` (round of (x/2+0.5)*255).

    One image per batch shard at a time (diffusers' ``enable_vae_slicing``, on every chip at once): the decode
    of a 1024² image needs about 1.7 GiB of activations, so a whole batch at once would bound the batch that
    samples on a chip by the VAE rather than by the denoising loop (docs/sampling.md).
    """
    vae = nnx.merge(graphdef, state).vae
    n = latents.shape[0]
    shards = active_batch_shards(n)

    def decode(z):
        image = vae.decode(z / vae.scaling_factor + vae.shift_factor)
        return jnp.round(jnp.clip(image / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)

    # (n, ...) -> (n / shards, shards, ...): each slice holds one image of every shard, so the shards stay apart.
    slices = jnp.swapaxes(latents.reshape(shards, n // shards, *latents.shape[1:]), 0, 1)
    images = jax.lax.map(decode, slices)
    return jnp.swapaxes(images, 0, 1).reshape(n, *images.shape[2:])
