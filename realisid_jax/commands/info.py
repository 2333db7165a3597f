"""``realisid info --config FILE``: parameter counts per component, computed with ``eval_shape``."""

from __future__ import annotations

from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts per component (no weights allocated)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/sdxl.py")
    p.add_argument("--train", action="store_true",
                   help="also the per-device memory of the training step (XLA memory analysis, FSDP over "
                        "--devices simulated CPU devices; compiles, runs nothing)")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64])
    p.set_defaults(func=run)


def parameter_counts(config) -> dict[str, int]:
    """Component name -> number of parameters; the branches are split into ``local_branch``,
    ``global_branch`` and ``id_projection``."""
    from realisid_jax.realisid.components import abstract_components

    models = abstract_components(config).named()
    realisid = models.pop("realisid")
    counts = {name: count_params(model) for name, model in models.items()}
    for name in ("local_branch", "global_branch", "id_projection"):
        counts[name] = count_params(getattr(realisid, name))
    return counts


def run(args) -> int:
    if args.train:
        import jax

        # Simulated CPU devices for the memory analysis; only takes effect before the first backend use (on a
        # GPU/TPU host the real devices are used).
        jax.config.update("jax_num_cpu_devices", max(args.devices))
    config = load_config(args.config, args.config_overrides)
    counts = parameter_counts(config)
    counts["trainable (branches)"] = counts["local_branch"] + counts["global_branch"] + counts["id_projection"]
    width = max(map(len, counts))
    print(f"{'component':<{width}}  {'parameters':>15}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>15,}")
    if args.train:
        print_memory_plan(config, args.devices)
    return 0


def print_memory_plan(config, devices: list[int]) -> None:
    """Per-device memory of the training step (both branches, ``train.resolution``, batch 1 per device)."""
    from realisid_jax.training.memory import train_step_memory

    gib = 2.0**30
    print(f"\ntraining step, {config.train.resolution}px, per-device batch 1, FSDP (XLA memory analysis):")
    print(f"{'devices':>8} {'weights+state GiB':>18} {'arguments GiB':>14} {'temporaries GiB':>16} {'peak GiB':>9}")
    for n in devices:
        p = train_step_memory(config, n)
        print(f"{n:>8} {p.state_bytes / gib:>18.2f} {p.argument_bytes / gib:>14.2f} {p.temp_bytes / gib:>16.2f} "
              f"{p.peak_bytes / gib:>9.2f}", flush=True)
