"""Text: the CLIP tokenizer (offline vocabulary or a checkpoint's ``tokenizer/``) and SD 1.5 / SDXL prompt
encoding (diffusers' ``encode_prompt``)."""
