"""Training data: preparation into a TFDS ``array_record`` dataset (``prepare``, ``builder``) and
the grain input pipeline (``input_pipeline``). Submodules are imported on demand: preparation pulls
in OpenCV and the face models, the input pipeline grain."""
