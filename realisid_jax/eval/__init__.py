"""Evaluation harness: the paper's protocol (ASP, identity similarity, CLIP-T, CLIP-I, pose and expression
error, by face size 1/4 … 1/7 and the small-face split), on the host with the project's own models.

  manifest   ``manifest.json`` format: generated image -> prompt, persons (reference, box, pose photo)
  identity   ``FaceEmbedder`` protocol; ``FaceNetEmbedder`` (user-supplied weights), ``CLIPFaceEmbedder``
             (the labelled fallback)
  clip_score ``ClipScorer``: CLIP-T, CLIP-I
  aesthetic  ``AestheticPredictor`` (LAION's improved aesthetic predictor, Flax NNX), ``AestheticScorer``: ASP
  pose       head pose by PnP against MediaPipe's canonical face model; expression error
  matching   greedy face <-> reference matching (multi-person)
  harness    ``Evaluator``: rows per (image, person)
  report     CSV / JSON / summary by face size / plot

Commands: ``realisid evaluate`` (``commands/evaluate.py``), ``realisid benchmark-prompts``
(``commands/benchmark_prompts.py``).
"""
