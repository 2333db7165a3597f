"""``realisid app``: the main job as a local web page. ``metadata`` (the generation record in PNG text chunks,
shared with ``realisid sample``), ``request`` (the request handler, no UI), ``page`` (the Gradio page)."""
