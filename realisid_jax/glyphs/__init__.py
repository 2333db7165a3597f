"""The glyph world: a synthetic identity world in which RealisID can be trained and scored on a CPU.

``world`` renders it; ``autoencoder``, ``text_to_image`` and ``identity_encoder`` train its base models;
``scorer`` and ``manifest`` score generated images; ``prepare`` builds everything (``realisid glyphs prepare``).
"""
