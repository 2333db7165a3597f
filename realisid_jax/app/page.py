"""The ``realisid app`` page (Gradio Blocks): persons with photos and face boxes, settings, Generate,
gallery.

Element ids (``elem_id``) are stable for the browser test: ``person-accordion-K``, ``reference-K``, ``face-K``,
``person-message-K``, ``pose-K`` (``rotation-K`` instead where the config's landmark layout is ``"square"``:
``Studio.takes_rotation``), ``box-x-K``, ``box-y-K``, ``box-w-K``, ``box-h-K`` per person slot K (from 0), and
``layout``, ``layout-message``, ``prompt``, ``height``, ``width``, ``steps``, ``seed``, ``random-seed``, ``generate``,
``status``, ``gallery``.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; must precede the import

import gradio as gr  # noqa: E402
import gradio.component_meta  # noqa: E402

from realisid_jax.app.request import (MAX_UPLOAD_MB, MIN_BOX_FRACTION, PersonRequest, Request,  # noqa: E402
                                      RequestError, Studio, UnreadablePhoto, read_photo)
from realisid_jax.schedulers import SCHEDULERS  # noqa: E402

_INTRO = ("Upload a reference photo per person, place each face on the output with the box controls (fractions "
          "of the image edge; faces may be small), write a prompt and press **Generate**. Boxes are made square "
          "and moved inside the image as the pipeline uses them: the layout shows both.")


# Gradio writes a type stub (page.pyi) next to the module of every component class it sees defined; this one
# needs none (and a stub would hide page.py from type checkers), so the writer is off while it is defined.
_write_stub, gradio.component_meta.create_or_modify_pyi = (gradio.component_meta.create_or_modify_pyi,
                                                           lambda *args, **kwargs: None)
try:
    class Photo(gr.Image):
        """A photo upload (the page's Image component) read by ``request.read_photo``: a file that gives no photo
        (not an image, cut short, a decompression bomb, over ``max_bytes``) reaches the handlers as an
        ``UnreadablePhoto``, which they show as the person's message, never as a server error."""

        is_template = True  # drawn by the frontend's Image component
        max_bytes: int | None = None  # set after construction: the page's props are gr.Image's constructor arguments

        @classmethod
        def upload(cls, max_bytes: int, **kwargs) -> Photo:
            photo = cls(type="numpy", sources=["upload"], **kwargs)
            photo.max_bytes = max_bytes
            return photo

        def preprocess(self, payload) -> np.ndarray | UnreadablePhoto | None:
            if payload is None:
                return None
            name = payload.orig_name or "the upload"
            if payload.path is None:  # an inline (data:) image, which the page's upload never sends
                return UnreadablePhoto(name, "is not an uploaded file; upload the photo as a file")
            return read_photo(payload.path, name, max_bytes=self.max_bytes)
finally:
    gradio.component_meta.create_or_modify_pyi = _write_stub


def build_page(studio: Studio, *, default_prompt: str = "", notice: str = "",
               max_upload_mb: float = MAX_UPLOAD_MB) -> gr.Blocks:
    """The page for ``studio``; ``notice`` (e.g. the random-weights warning) is shown at the top; photos over
    ``max_upload_mb`` are refused (``launch`` stops larger uploads while they arrive)."""
    max_bytes = int(max_upload_mb * 2**20)
    s = studio.config.sampling
    with gr.Blocks(title="RealisID", analytics_enabled=False) as page:
        gr.Markdown("# RealisID\n" + _INTRO)
        if notice:
            gr.Markdown(f"**Note:** {notice}", elem_id="notice")
        person_inputs = []
        with gr.Row():
            with gr.Column(scale=1):
                for k in range(studio.max_persons):
                    with gr.Accordion(f"Person {k + 1}", open=k == 0, elem_id=f"person-accordion-{k}"):
                        reference = Photo.upload(label="reference photo", elem_id=f"reference-{k}", height=220,
                                                 max_bytes=max_bytes)
                        face = gr.Image(label="detected face and landmarks", interactive=False,
                                        elem_id=f"face-{k}", height=220)
                        message = gr.Markdown(elem_id=f"person-message-{k}")
                        # A square subject's pose is a rotation; a pose photo of one always reads as upright.
                        pose = Photo.upload(label="pose / expression photo (optional)", elem_id=f"pose-{k}",
                                            height=160, visible=not studio.takes_rotation, max_bytes=max_bytes)
                        rotation = gr.Number(label="rotation, degrees counter-clockwise (empty: upright)",
                                             value=None, elem_id=f"rotation-{k}", visible=studio.takes_rotation)
                        box = [gr.Slider(0, 1, value=v, step=1 / 64, label=label, elem_id=f"box-{key}-{k}")
                               for key, label, v in (("x", "box centre x", 0.5 if k == 0 else 0.25 + 0.5 * (k % 2)),
                                                     ("y", "box centre y", 0.3 + 0.4 * (k // 2)))]
                        box += [gr.Slider(MIN_BOX_FRACTION, 1, value=0.25, step=1 / 64, label=label,
                                          elem_id=f"box-{key}-{k}")
                                for key, label in (("w", "box width"), ("h", "box height"))]
                    reference.change(studio.face_preview, reference, [face, message])
                    person_inputs.append((reference, pose, rotation, box))
            with gr.Column(scale=1):
                layout = gr.Image(label="face boxes on the output (thin: as set, thick: as used)",
                                  interactive=False, elem_id="layout")
                layout_message = gr.Markdown(elem_id="layout-message")
                prompt = gr.Textbox(label="prompt", value=default_prompt, lines=2, elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value=s.negative_prompt, elem_id="negative-prompt")
                with gr.Row():
                    height = gr.Number(label="height (multiple of 64)", value=s.height, precision=0,
                                       elem_id="height")
                    width = gr.Number(label="width (multiple of 64)", value=s.width, precision=0, elem_id="width")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=s.num_inference_steps, step=1, label="steps", elem_id="steps")
                    scheduler = gr.Dropdown(sorted(SCHEDULERS), value=s.scheduler, label="scheduler")
                with gr.Row():
                    text_scale = gr.Slider(0, 20, value=s.text_guidance_scale, step=0.5, label="λ_t (text guidance)")
                    id_scale = gr.Slider(0, 20, value=s.id_guidance_scale, step=0.5, label="λ_i (ID guidance)")
                id_start = gr.Slider(0, 1, value=s.id_start_fraction, step=0.05,
                                     label="ID start fraction (ID off for this part of the steps)")
                with gr.Row():
                    seed = gr.Number(label="seed", value=s.seed, precision=0, elem_id="seed")
                    random_seed = gr.Checkbox(label="random seed", value=False, elem_id="random-seed")
                    num_images = gr.Slider(1, 8, value=1, step=1, label="number of images")
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="images and conditioning sheet", format="png", columns=2,
                                     elem_id="gallery")

        boxes = [c for *_, box in person_inputs for c in box]
        size = [height, width]

        def persons(values) -> list[PersonRequest]:
            # values: per slot reference, pose, rotation, then its 4 box fractions
            per = 7
            return [PersonRequest(values[i], tuple(values[i + 3:i + 7]), values[i + 1], values[i + 2])
                    for i in range(0, len(values), per)]

        slot_values = [c for reference, pose, rotation, box in person_inputs
                       for c in (reference, pose, rotation, *box)]

        def show_layout(h, w, *values):
            return studio.layout_preview(persons(values), h, w)

        for control in [*boxes, *size, *(reference for reference, *_ in person_inputs)]:
            control.change(show_layout, [*size, *slot_values], [layout, layout_message])
        page.load(show_layout, [*size, *slot_values], [layout, layout_message])

        def run(prompt_, negative_, h, w, steps_, scheduler_, text_, id_, start_, seed_, random_, n_, *values,
                progress=gr.Progress(track_tqdm=True)):
            request = Request(prompt_, persons(values), h, w, steps_, scheduler_, text_, id_, start_,
                              None if random_ else seed_, n_, negative_)
            try:
                result = studio.generate(request)
            except RequestError as err:
                return gr.update(), f"⚠️ {err}", gr.update()
            g = result.generation
            items = [(str(p), f"image {i + 1}") for i, p in enumerate(result.images)]
            items.append((str(result.sheet), "conditioning sheet"))
            return items, (f"Done in {result.seconds:.1f} s: seed {g.seed}, {g.width}x{g.height}, {g.steps} steps "
                           f"({g.scheduler}). Files: `{result.sheet.parent}`"), g.seed

        generate.click(run, [prompt, negative, height, width, steps, scheduler, text_scale, id_scale, id_start, seed,
                             random_seed, num_images, *slot_values], [gallery, status, seed])
    return page


def launch(page: gr.Blocks, *, host: str = "127.0.0.1", port: int = 7860, out: str | None = None,
           auth: tuple[str, str] | None = None, max_upload_mb: float = MAX_UPLOAD_MB, block: bool = True):
    """Serves ``page`` (queued: one Generate at a time, the others shown their place in the queue).

    ``auth`` (user, password): the page asks for them (Gradio's login) before anything else. Uploads over
    ``max_upload_mb`` are stopped while they arrive (HTTP 413, the page shows Gradio's message). ``block=False``
    returns at once (tests); ``page.close()`` stops it.
    """
    return page.queue(default_concurrency_limit=1).launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, show_error=False,
        allowed_paths=[out] if out else None, footer_links=[], auth=auth,
        max_file_size=int(max_upload_mb * 2**20), prevent_thread_lock=not block, quiet=not block)
