"""``realisid info --config FILE``: parameter counts per component, computed with ``eval_shape``."""

from __future__ import annotations

from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts per component (no weights allocated)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/sdxl.py")
    p.set_defaults(func=run)


def parameter_counts(config) -> dict[str, int]:
    """Component name -> number of parameters; the branches are split into ``local_branch``,
    ``global_branch`` and ``id_projection``."""
    from realisid_jax.models.factory import abstract_components

    models = abstract_components(config)
    realisid = models.pop("realisid")
    counts = {name: count_params(model) for name, model in models.items()}
    for name in ("local_branch", "global_branch", "id_projection"):
        counts[name] = count_params(getattr(realisid, name))
    return counts


def run(args) -> int:
    config = load_config(args.config, args.config_overrides)
    counts = parameter_counts(config)
    counts["trainable (branches)"] = counts["local_branch"] + counts["global_branch"] + counts["id_projection"]
    width = max(map(len, counts))
    print(f"{'component':<{width}}  {'parameters':>15}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>15,}")
    return 0
