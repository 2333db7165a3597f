"""`realisid glyphs make-data` and `realisid glyphs evaluate`: the request set is fixed and covers every box size and
palette colour; with random models the benchmark samples every variant through the real pipeline, writes manifests,
report and plots, and a re-run skips the finished variants."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from realisid_jax.cli import main
from realisid_jax.config import load_config
from realisid_jax.glyphs import benchmark, manifest, world
from realisid_jax.glyphs.scorer import BOX_FRACTIONS

CONFIG = "configs/sdxl.py:glyphs"
# Smaller than the glyph world's models and images: the test compiles 4 sampling loops (2 models x 1 and 2 persons).
SMALL = ["--config.sampling.height=128", "--config.sampling.width=128", "--config.model.unet.layers_per_block=1"]
VARIANTS = ("base", "realisid", "plain_cfg")  # no branches; branches; branches with other guidance (same program)


def test_request_set_is_fixed_and_covers_every_cell():
    requests = benchmark.request_set(per_cell=1)
    again = benchmark.request_set(per_cell=1)
    assert [(r.name, r.spec, r.seed) for r in requests] == [(r.name, r.spec, r.seed) for r in again]
    assert all(np.array_equal(a.image, b.image) for r, s in zip(requests, again)
               for a, b in zip(r.references, s.references))
    assert len(requests) == 2 * len(BOX_FRACTIONS)
    cells = {(len(r.spec.persons), r.bucket) for r in requests}
    assert cells == {(n, b) for n in (1, 2) for b in benchmark.BUCKETS}
    assert {r.spec.background for r in requests} == set(world.BACKGROUNDS)
    assert all(r.spec.background in r.spec.caption for r in requests)
    for r in requests:
        edge = round(BOX_FRACTIONS[benchmark.BUCKETS.index(r.bucket)] * 256)  # 1/10: 26 px
        assert all(p.box[2] - p.box[0] == p.box[3] - p.box[1] == edge for p in r.spec.persons)
        assert all(0 <= v <= 256 for p in r.spec.persons for v in p.box)
        assert all(-40 <= p.rotation_deg <= 40 for p in r.spec.persons)
        assert all(ref.style in world.HELDOUT_STYLES and ref.identity == p.identity
                   for ref, p in zip(r.references, r.spec.persons))
        if len(r.spec.persons) == 2:
            a, b = (p.box for p in r.spec.persons)
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]  # side by side, no overlap
            assert r.spec.persons[0].identity != r.spec.persons[1].identity
    # Request j of a cell does not depend on how many a cell holds: a larger set extends a smaller one.
    larger = {r.name: r for r in benchmark.request_set(per_cell=2)}
    assert all(larger[r.name].spec == r.spec and larger[r.name].seed == r.seed for r in requests)


def test_plain_cfg_is_eq8_with_id_scale_equal_to_text_scale():
    config = load_config(CONFIG)
    plain = benchmark.variant_config(config, "plain_cfg").sampling
    e_none, e_text, e_id = np.random.default_rng(0).normal(size=(3, 8))
    eq8 = e_none + plain.text_guidance_scale * (e_text - e_none) + plain.id_guidance_scale * (e_id - e_text)
    np.testing.assert_allclose(eq8, e_none + plain.text_guidance_scale * (e_id - e_none))
    base = benchmark.variant_config(config, "base")
    assert (base.realisid.local_scale, base.realisid.global_scale, base.sampling.id_guidance_scale) == (0, 0, 0)
    assert config.realisid.local_scale == 1.0  # the variants copy the config
    with pytest.raises(ValueError, match="unknown variant"):
        benchmark.variant_overrides("nope", config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny RUN (random glyph-config base pipeline, random branches, a 2-step scorer)."""
    from realisid_jax.glyphs.scorer import train_scorer
    from realisid_jax.loading.branch_folders import export_branches
    from realisid_jax.loading.pipeline_writer import save_pipeline_folder
    from realisid_jax.realisid.branches import RealisID, RealisIDConfig
    from realisid_jax.models import registry
    from realisid_jax.text.tokenizer import standard_tokenizers

    root = tmp_path_factory.mktemp("glyph_bench")
    config = load_config(CONFIG, SMALL)
    rngs = nnx.Rngs(0)
    models = {name: cls(cfg, rngs=rngs, **registry.dtypes(config))
              for name, (cls, cfg) in registry.frozen_configs(config).items()}
    tokenizers = standard_tokenizers(2)
    save_pipeline_folder(root / "run" / "base", **models, tokenizer=tokenizers[0], tokenizer_2=tokenizers[1])
    branches = RealisID(RealisIDConfig.from_config(config), rngs=nnx.Rngs(1))
    # Perturbed, zero-initialised convolutions too: fresh branches would add exactly nothing.
    rng = np.random.default_rng(1)
    nnx.update(branches, jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype),
                                      nnx.state(branches, nnx.Param)))
    export_branches(branches, root / "branches")
    scorer, _ = train_scorer(num_steps=2, num_scenes=4, batch_size=8, eval_per_size=0, progress=False)
    scorer.save(root / "run" / "scorer")
    return root


def _evaluate(run, out):
    return main(["glyphs", "evaluate", "--run", str(run / "run"), "--branches", str(run / "branches"), "--out",
                 str(out), "--per-cell", "1", "--steps", "2", "--variants", ",".join(VARIANTS), *SMALL])


def test_evaluate_writes_manifests_report_and_plots_then_resumes(run, capsys):
    out = run / "report"
    assert _evaluate(run, out) == 0
    requests = 2 * len(BOX_FRACTIONS)
    for variant in VARIANTS:
        records = manifest.read_manifest(out / "variants" / variant / "manifest.jsonl")
        assert len(records) == requests and {r.variant for r in records} == {variant}
        assert all((out / "variants" / variant / r.image).is_file() for r in records)
        assert all(manifest.resolve(out / "variants" / variant / "manifest.jsonl", p.reference).is_file()
                   for r in records for p in r.persons)
    result = json.loads((out / "report.json").read_text())
    assert list(result["variants"]) == list(VARIANTS)
    realisid = result["variants"]["realisid"]
    assert set(realisid["buckets"]) == set(benchmark.BUCKETS)
    assert 0 <= realisid["buckets"]["1/10"]["identity_accuracy"] <= 1
    assert realisid["all"]["two_person_images"] == len(BOX_FRACTIONS)
    text = (out / "report.md").read_text()
    assert "| realisid |" in text and "1/10" in text and "Targets" in text
    assert (out / "identity_vs_box.png").stat().st_size > 0 and (out / "grid.png").stat().st_size > 0
    # Same seeds for every variant: the images differ only where the variant changes the sampling.
    images = {v: np.asarray(Image.open(out / "variants" / v / "images" / "2p-1_4-000.png")) for v in VARIANTS}
    assert images["base"].shape == (128, 128, 3)
    assert not np.array_equal(images["base"], images["realisid"])
    assert not np.array_equal(images["realisid"], images["plain_cfg"])
    assert len(list((out / "references").glob("*.png"))) == 3 * len(BOX_FRACTIONS)
    capsys.readouterr()
    before = {p: p.stat().st_mtime_ns for p in out.glob("variants/*/images/*.png")}
    assert _evaluate(run, out) == 0
    assert capsys.readouterr().out.count("skipped") == len(VARIANTS)
    assert {p: p.stat().st_mtime_ns for p in out.glob("variants/*/images/*.png")} == before
    assert json.loads((out / "report.json").read_text())["variants"]["realisid"]["buckets"] == realisid["buckets"]
    # An interrupted variant (no manifest yet) samples only its missing images.
    folder = out / "variants" / "plain_cfg"
    (folder / "manifest.jsonl").unlink()
    (folder / "images" / "1p-1_3-000.png").unlink()
    assert _evaluate(run, out) == 0
    after = {p: p.stat().st_mtime_ns for p in out.glob("variants/*/images/*.png")}
    assert {p for p in before if after[p] != before[p]} == {folder / "images" / "1p-1_3-000.png"}
    assert len(manifest.read_manifest(folder / "manifest.jsonl")) == requests


def test_evaluate_refuses_other_settings_and_missing_branches(run, capsys):
    out = run / "report"
    if not (out / "settings.json").is_file():
        pytest.skip("needs the report of the test above")
    assert main(["glyphs", "evaluate", "--run", str(run / "run"), "--branches", str(run / "branches"), "--out",
                 str(out), "--per-cell", "1", "--steps", "3", "--variants", ",".join(VARIANTS), *SMALL]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["glyphs", "evaluate", "--run", str(run / "run"), "--out", str(run / "other")]) == 2
    assert "--branches" in capsys.readouterr().err
    assert main(["glyphs", "evaluate", "--run", str(run / "run"), "--branches", str(run / "branches"), "--out",
                 str(run / "other"), "--variants", "realisid,nope"]) == 2
    assert "unknown nope" in capsys.readouterr().err


def test_make_data_writes_a_training_set(tmp_path):
    from realisid_jax.data.builder import open_split

    assert main(["glyphs", "make-data", "--out", str(tmp_path / "data"), "--count", "3", "--seed", "5"]) == 0
    split = open_split(tmp_path / "data")
    assert len(split) == 3
    example = split[0]
    assert example["image"].shape == (256, 256, 3) and example["reference"].shape == (32, 32, 3)  # the image encoder's size
    assert example["landmarks"].shape == (world.NUM_KEYPOINTS, 2)
