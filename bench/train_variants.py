"""The trainer's step under several config variants (kernels, remat), interleaved in one process, samples/s.

    python -m bench.train_variants --config tiny --variant attention_impl=chunked,conv_impl=im2col \\
        --variant attention_impl=xla,conv_impl=xla --variant attention_impl=xla,conv_impl=xla,train.remat=False

Each ``--variant`` is a comma-separated list of config overrides (``--config.KEY=VALUE`` without the prefix);
every variant's step is compiled first, then all are called round-robin (``bench.timing.interleaved``: one
untimed round, medians of ``--repeat``), so a change of machine load hits each alike.
"""

from __future__ import annotations

import argparse
import sys

from bench.timing import interleaved, load_average


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny", help="tiny | mid | PATH")
    p.add_argument("--variant", action="append", required=True, help="KEY=VALUE[,KEY=VALUE...] overrides")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    from realisid_jax.cli import choose_platform

    choose_platform()
    from bench.run import ROOT, SHORT_NAMES
    from bench.training import trainer
    from realisid_jax.config import load_config

    path = ROOT / "configs" / SHORT_NAMES[args.config] if args.config in SHORT_NAMES else args.config
    runs, batch = {}, {}
    for variant in args.variant:
        config = load_config(path, [o for o in variant.split(",") if o])
        runs[variant], batch[variant], _ = trainer(config)
    med = interleaved(runs, args.repeat)
    print(f"training step, config {args.config}, medians of {args.repeat} interleaved, {load_average()} (at the end)")
    for variant, seconds in med.items():
        print(f"  {variant}: {seconds:.3f} s/step, {batch[variant] / seconds:.2f} samples/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
