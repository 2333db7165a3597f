"""``realisid info --config FILE``: parameter counts per component, computed with ``eval_shape``; with
``--train`` / ``--sample`` the per-chip memory plan of the training step / of sampling, compiled ahead of time
for simulated CPU devices (``--devices``) or for Cloud TPU topologies (``--topology``, the TPU compiler's own
figures; needs the ``tpu`` extra)."""

from __future__ import annotations

from realisid_jax.commands.arguments import UsageError, positive_int
from realisid_jax.config import load_config
from realisid_jax.models.modeling_utils import count_params


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="parameter counts per component (no weights allocated)")
    p.add_argument("--config", required=True, help="config file, e.g. configs/sdxl.py")
    p.add_argument("--train", action="store_true",
                   help="also the per-device memory of the training step (XLA memory analysis, FSDP over "
                        "--devices simulated CPU devices; compiles, runs nothing)")
    p.add_argument("--sample", action="store_true",
                   help="also the per-chip memory of sampling one image with one person (the guided denoising "
                        "loop and the VAE decode), on the fewest chips of --topology that hold it")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64],
                   help="simulated CPU devices to plan for (XLA:CPU's estimate)")
    p.add_argument("--per-device-batch", type=positive_int, default=1,
                   help="training examples per device for --train (global batch: this x devices)")
    p.add_argument("--topology", nargs="+", default=None,
                   help="TPU topologies to compile for instead (e.g. v5e:2x4 v4:2x2x1 v5p:2x2x1 v6e:2x2): the "
                        "TPU compiler's per-chip figures")
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
    if args.sample and args.topology and len(args.topology) != 1:
        raise UsageError("--sample plans one --topology at a time")
    if (args.train or args.sample) and not args.topology:
        import jax

        # Simulated CPU devices for the memory analysis; only takes effect before the first backend use (on a
        # GPU/TPU host the real devices are used).
        jax.config.update("jax_num_cpu_devices", max(args.devices))
    config = load_config(args.config, args.config_overrides)
    if (args.train or args.sample) and not args.topology and config.attention_impl == "splash":
        # The simulated devices are XLA:CPU, where the TPU kernel does not build; same maths, other memory.
        print("note: planning for simulated CPU devices with attention_impl=xla (splash is a TPU kernel)")
        config.attention_impl = "xla"
    counts = parameter_counts(config)
    counts["trainable (branches)"] = counts["local_branch"] + counts["global_branch"] + counts["id_projection"]
    width = max(map(len, counts))
    print(f"{'component':<{width}}  {'parameters':>15}")
    for name, n in counts.items():
        print(f"{name:<{width}}  {n:>15,}")
    if args.train and args.topology and not print_tpu_train_plans(config, args.topology, args.per_device_batch):
        return 1
    if args.train and not args.topology:
        print_memory_plan(config, args.devices, args.per_device_batch)
    if args.sample:
        return print_sample_plan(config, args.topology[0] if args.topology else None, max(args.devices))
    return 0


def print_memory_plan(config, devices: list[int], per_device_batch: int = 1) -> None:
    """Per-device memory of the training step (both branches, ``train.resolution``, ``per_device_batch``)."""
    from realisid_jax.training.memory import train_step_memory

    gib = 2.0**30
    print(f"\ntraining step, {config.train.resolution}px, per-device batch {per_device_batch}, FSDP (XLA memory "
          f"analysis):")
    print(f"{'devices':>8} {'weights+state GiB':>18} {'arguments GiB':>14} {'temporaries GiB':>16} {'peak GiB':>9}")
    for n in devices:
        p = train_step_memory(config, n, per_device_batch=per_device_batch)
        print(f"{n:>8} {p.state_bytes / gib:>18.2f} {p.argument_bytes / gib:>14.2f} {p.temp_bytes / gib:>16.2f} "
              f"{p.peak_bytes / gib:>9.2f}", flush=True)


GIB = 2.0**30


def _estimate(seconds: float) -> str:
    # The compiler's roofline time is meaningless for tiny programs (negative values were seen): not shown.
    return f"{seconds:.3f}" if seconds > 0 else "n/a"


def _tpu_devices(topology: str) -> list:
    from realisid_jax.training.aot import topology_devices

    try:
        return topology_devices(topology)
    except ValueError as error:
        raise UsageError(str(error)) from error


def _compiler_refusal(error: Exception) -> str:
    """The TPU compiler's out-of-memory line (``RESOURCE_EXHAUSTED: ... exceeds available HBM``)."""
    lines = [line.strip() for line in str(error).splitlines() if "RESOURCE_EXHAUSTED" in line or "HBM" in line]
    return (lines or [str(error).splitlines()[0]])[0][:300]


def print_tpu_train_plans(config, topologies: list[str], per_device_batch: int = 1) -> bool:
    """Per-chip figures of the training step on each TPU topology (FSDP over all its chips, ``per_device_batch``):
    the TPU compiler's memory analysis against the chip's HBM, its FLOPs and roofline time. Returns whether
    the step fits every topology."""
    from realisid_jax.training.aot import device_hbm_bytes, host_peak_rss_bytes
    from realisid_jax.training.memory import train_step_memory

    print(f"\ntraining step, {config.train.resolution}px, batch {per_device_batch} per device, FSDP over the slice "
          f"(TPU compiler's figures per device: a chip, or a TensorCore of a v4 chip):")
    print(f"{'topology':>10} {'hosts':>5} {'devices':>7} {'weights+state':>13} {'arguments':>9} {'temporaries':>11} "
          f"{'peak':>7} {'HBM':>5}  {'fits':<12} {'TFLOP/step':>10} {'est. s/step':>11} {'compile s':>9} "
          f"{'host GiB':>8}")
    fits_all = True
    for topology in topologies:
        devices = _tpu_devices(topology)
        hosts = len({d.process_index for d in devices})
        try:
            p = train_step_memory(config, len(devices), per_device_batch=per_device_batch, devices=devices)
        except Exception as error:  # noqa: BLE001 - libtpu's XlaRuntimeError; anything else is re-raised
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            fits_all = False
            print(f"{topology:>10} {hosts:>5} {len(devices):>7}  does not fit: {_compiler_refusal(error)}", flush=True)
            continue
        hbm = device_hbm_bytes(devices)
        fits = "fits" if p.peak_bytes <= hbm else "does not fit"
        fits_all &= p.peak_bytes <= hbm
        print(f"{topology:>10} {hosts:>5} {len(devices):>7} {p.state_bytes / GIB:>13.2f} {p.argument_bytes / GIB:>9.2f} "
              f"{p.temp_bytes / GIB:>11.2f} {p.peak_bytes / GIB:>7.2f} {hbm / GIB:>5.0f}  {fits:<12} "
              f"{p.flops / 1e12:>10.2f} {_estimate(p.optimal_seconds):>11} {p.compile_seconds:>9.0f} "
              f"{host_peak_rss_bytes() / GIB:>8.1f}", flush=True)
    print("(GiB per chip; TFLOP and s/step are the compiler's per-chip cost analysis, s/step its roofline "
          "estimate, not a measurement)")
    return fits_all


def print_sample_plan(config, topology: str | None, cpu_devices: int) -> int:
    """Sampling one image with one person on 1, 2, 4, ... chips of ``topology`` (weights FSDP-sharded) until
    it fits a chip's HBM; without a topology on ``cpu_devices`` simulated CPU devices (no HBM to compare)."""
    import jax

    from realisid_jax.training.aot import device_hbm_bytes, host_peak_rss_bytes, sample_plan

    devices = _tpu_devices(topology) if topology else jax.devices()[:cpu_devices]
    hbm = device_hbm_bytes(devices) if topology else None
    s = config.sampling
    print(f"\nsampling {s.height}x{s.width}, 1 image, 1 person, {s.num_inference_steps} steps "
          f"({topology or 'simulated CPU devices'}; GiB per chip):")
    print(f"{'chips':>5} {'denoise peak':>12} {'decode peak':>11} {'HBM':>5}  {'fits':<12} {'TFLOP/step':>10} "
          f"{'est. s/step':>11} {'compile s':>9} {'host GiB':>8}")
    n = 1
    while n <= len(devices):
        try:
            plan = sample_plan(config, devices[:n])
        except Exception as error:  # noqa: BLE001 - libtpu's XlaRuntimeError; anything else is re-raised
            if hbm is None or "RESOURCE_EXHAUSTED" not in str(error):
                raise
            print(f"{n:>5}  does not fit: {_compiler_refusal(error)}", flush=True)
            n *= 2
            continue
        d = plan.denoise
        fits = "-" if hbm is None else ("fits" if plan.peak_bytes <= hbm else "does not fit")
        # The loop's cost analysis counts its body once: one guided step (3 predictions).
        print(f"{n:>5} {d['peak_bytes'] / GIB:>12.2f} {plan.decode['peak_bytes'] / GIB:>11.2f} "
              f"{(hbm or 0) / GIB:>5.0f}  {fits:<12} {d['flops'] / 1e12:>10.2f} {_estimate(d['optimal_seconds']):>11} "
              f"{d['compile_seconds'] + plan.decode['compile_seconds']:>9.0f} {host_peak_rss_bytes() / GIB:>8.1f}",
              flush=True)
        if hbm is not None and plan.peak_bytes <= hbm:
            print(f"smallest slice that samples: {n} chip{'s' if n > 1 else ''} of {topology}")
            return 0
        n *= 2
    return 0 if hbm is None else 1
