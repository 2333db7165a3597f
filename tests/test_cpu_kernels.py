"""The XLA:CPU kernel choice (``models.cpu_kernels``, ``realisid tune-cpu``): CPU detection, the selection with a
fake clock, the cache, the configs' per-ISA defaults; and each kernel pair computes the same as XLA's own."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realisid_jax.config import load_config
from realisid_jax.models import cpu_kernels
from realisid_jax.models.cpu_kernels import Kernels
from realisid_jax.models.layers import attention, im2col_conv_general_dilated

ROOT = Path(__file__).resolve().parents[1]
XLA, CHUNKED_IM2COL = Kernels("xla", "xla"), Kernels("chunked", "im2col")
AVX512_INFO = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512vl avx512_bf16\n"
AVX2_INFO = "model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx2 fma\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cpu_kernels.json"
    monkeypatch.setenv("REALISID_CPU_KERNELS", str(path))
    return path


def test_cpu_key_tells_avx512_from_avx2_under_one_model_name():
    assert cpu_kernels.cpu_key(AVX512_INFO, cores=2) == "AMD EPYC|avx512|2"
    assert cpu_kernels.cpu_key(AVX2_INFO, cores=2) == "AMD EPYC|avx2|2"
    assert cpu_kernels.cpu_key("", cores=4) == "unknown|baseline|4"


class FakeClock:
    """A clock that each candidate's run advances by that candidate's cost (plus noise on one round)."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def runner(self, costs):
        def run():
            self.now += costs.pop(0) if costs else 0.0
        return run


def test_selection_takes_the_median_fastest_and_keeps_xla_within_the_margin():
    clock = FakeClock()
    # One untimed round first, then 3 timed: the median ignores the one slow outlier of chunked/im2col.
    runs = {XLA: clock.runner([9.0, 1.0, 1.0, 1.0]),
            CHUNKED_IM2COL: clock.runner([9.0, 0.5, 5.0, 0.5]),
            Kernels("xla", "im2col"): clock.runner([9.0, 0.99, 0.99, 0.99])}
    seconds = cpu_kernels.median_seconds(runs, repeat=3, clock=clock)
    assert seconds == pytest.approx({XLA: 1.0, CHUNKED_IM2COL: 0.5, Kernels("xla", "im2col"): 0.99})
    assert cpu_kernels.fastest(seconds, prefer=XLA) == CHUNKED_IM2COL
    del seconds[CHUNKED_IM2COL]
    assert cpu_kernels.fastest(seconds, prefer=XLA) == XLA  # 1 % faster is noise on a shared machine


def test_cache_round_trip_keeps_other_entries(cache):
    cpu_kernels.record("A|avx2|2", "shapes", CHUNKED_IM2COL, {CHUNKED_IM2COL: 1.0, XLA: 2.0}, cache)
    cpu_kernels.record("B|avx512|2", "shapes", XLA, {XLA: 1.0}, cache)
    assert cpu_kernels.lookup("A|avx2|2", "shapes") == CHUNKED_IM2COL
    assert cpu_kernels.lookup("B|avx512|2", "shapes") == XLA
    assert cpu_kernels.lookup("B|avx512|2", "other shapes") is None
    assert json.loads(cache.read_text())["A|avx2|2"]["shapes"]["seconds"] == {"chunked/im2col": 1.0, "xla/xla": 2.0}


def test_damaged_or_disabled_cache_gives_the_isa_default(cache, monkeypatch):
    config = load_config(ROOT / "configs/sd15.py:mid")
    defaults = {"avx2": CHUNKED_IM2COL, "avx512": XLA}
    cache.write_text("{not json")
    assert cpu_kernels.choose(config, defaults, XLA, cpu="M|avx2|2") == CHUNKED_IM2COL
    cpu_kernels.record("M|avx2|2", cpu_kernels.shape_key(config), XLA, {}, cache)
    assert cpu_kernels.choose(config, defaults, XLA, cpu="M|avx2|2") == XLA  # the measurement wins
    monkeypatch.setenv("REALISID_CPU_KERNELS", "off")
    assert cpu_kernels.choose(config, defaults, XLA, cpu="M|avx2|2") == CHUNKED_IM2COL
    assert cpu_kernels.choose(config, defaults, XLA, cpu="M|baseline|2") == XLA  # the fallback


@pytest.mark.parametrize("name", ["sd15.py:mid", "sdxl.py:tiny", "sdxl.py:glyphs"])
def test_configs_choose_by_the_cpu_they_load_on(name, cache, monkeypatch):
    expected = {"sd15.py:mid": {"avx2": CHUNKED_IM2COL, "avx512": CHUNKED_IM2COL, "baseline": CHUNKED_IM2COL},
                "sdxl.py:tiny": {"avx2": CHUNKED_IM2COL, "avx512": CHUNKED_IM2COL, "baseline": CHUNKED_IM2COL},
                "sdxl.py:glyphs": {"avx2": XLA, "avx512": XLA, "baseline": XLA}}[name]
    for isa, kernels in expected.items():
        monkeypatch.setattr(cpu_kernels, "cpu_key", lambda isa=isa: f"AMD EPYC|{isa}|2")
        config = load_config(ROOT / "configs" / name)
        assert Kernels(config.attention_impl, config.conv_impl) == kernels, isa
        # A tuned entry for this CPU and these shapes replaces the default; the command line still wins.
        other = Kernels("chunked", "xla")
        cpu_kernels.record(f"AMD EPYC|{isa}|2", cpu_kernels.shape_key(config), other, {}, cache)
        config = load_config(ROOT / "configs" / name)
        assert Kernels(config.attention_impl, config.conv_impl) == other
        config = load_config(ROOT / "configs" / name, ["attention_impl=xla"])
        assert config.attention_impl == "xla"


def test_tune_cpu_writes_the_fastest_for_this_cpu_and_shapes(cache, monkeypatch, capsys):
    from realisid_jax.cli import main
    from realisid_jax.commands import tune_cpu

    costs = {XLA: 1.0, CHUNKED_IM2COL: 2.0, Kernels("xla", "im2col"): 3.0, Kernels("chunked", "xla"): 0.5}
    clock = FakeClock()
    monkeypatch.setattr(tune_cpu, "unet_workload", lambda config, k: clock.runner([costs[k]] * 4))
    monkeypatch.setattr(cpu_kernels, "median_seconds", functools.partial(cpu_kernels.median_seconds, clock=clock))
    monkeypatch.setattr(cpu_kernels, "cpu_key", lambda: "AMD EPYC|avx512|2")
    assert main(["tune-cpu", "--config", str(ROOT / "configs/sdxl.py:tiny"), "--repeat", "1"]) == 0
    config = load_config(ROOT / "configs/sdxl.py:tiny")
    assert Kernels(config.attention_impl, config.conv_impl) == Kernels("chunked", "xla")
    assert "chosen chunked/xla, written to" in capsys.readouterr().out
    assert main(["tune-cpu", "--config", "configs/sdxl.py:tiny", "--config.train.batch_size=2"]) == 2


# ------------------------------------------------------------------------------------------ same maths
def test_chunked_attention_equals_xla_attention():
    """1024 queries x 1024 keys (the 32x32 latent's self-attention: the chunked path applies), 8 heads x 40."""
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 1024, 320), jnp.float32) for i in range(3))
    ref = attention(q, k, v, 8, implementation="xla")
    out = jax.jit(lambda q, k, v: attention(q, k, v, 8, implementation="chunked"))(q, k, v)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("stride, padding", [(1, ((1, 1), (1, 1))), (2, ((0, 1), (0, 1)))])
def test_im2col_conv_equals_xla_conv(stride, padding):
    """A 3x3 conv of an 8x8 map (the im2col path applies), as the UNet's convs and down-samplers."""
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 64), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 32), jnp.float32) / 24
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ref = jax.lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=dims)
    out = jax.jit(lambda x, w: im2col_conv_general_dilated(x, w, (stride, stride), padding,
                                                           dimension_numbers=dims))(x, w)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-4)
