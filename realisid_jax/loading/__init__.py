"""Checkpoints in the formats people download -> the project's models (and trained branches back out).

Depends on ``models/`` only, never the reverse: diffusers / transformers folders (``pretrained``,
``pipeline_folder``), Stability single files (``single_file``), the converted orbax cache (``orbax_cache``),
branch folders (``branch_folders``), LoRAs merged into loaded models (``lora``); ``torch_state`` is the
PyTorch <-> NNX rename + transpose.
"""
