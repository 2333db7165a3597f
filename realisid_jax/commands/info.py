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
                   help="also the per-chip memory and time of sampling one image (the guided denoising phases "
                        "and the VAE decode), on the fewest chips of --topology that hold it")
    p.add_argument("--devices", type=int, nargs="+", default=[8, 64],
                   help="simulated CPU devices to plan for (XLA:CPU's estimate)")
    p.add_argument("--per-device-batch", type=positive_int, default=1,
                   help="training examples per device for --train (global batch: this x devices)")
    p.add_argument("--persons", type=positive_int, nargs="+", default=[1],
                   help="person slots to plan --sample / --max-batch for (e.g. 1 4)")
    p.add_argument("--estimate", action="store_true",
                   help="with --train --topology: the training step's per-chip peak estimated from its parts "
                        "(training/peak_law.py) instead of compiled: for steps whose compile needs more host "
                        "memory than there is")
    p.add_argument("--max-batch", action="store_true",
                   help="the largest batch of images one chip of --topology samples, found by compiling")
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
    if (args.sample or args.max_batch) and args.topology and len(args.topology) != 1:
        raise UsageError("--sample and --max-batch plan one --topology at a time")
    if args.estimate and not (args.train and args.topology):
        raise UsageError("--estimate estimates the training step's peak on TPU: give --train and --topology")
    if args.estimate and args.per_device_batch != 1:
        raise UsageError("--estimate holds for a batch of 1 per device, where its law was fitted and checked "
                         "(docs/training.md); compile the step for larger batches (without --estimate)")
    if args.max_batch and not args.topology:
        raise UsageError("--max-batch needs a TPU --topology (its chip's HBM is what the batch fills)")
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
    if args.estimate:
        print_tpu_train_estimates(config, args.topology, args.per_device_batch)
    elif args.train and args.topology and not print_tpu_train_plans(config, args.topology, args.per_device_batch):
        return 1
    if args.train and not args.topology:
        print_memory_plan(config, args.devices, args.per_device_batch)
    status = 0
    if args.sample:
        status |= print_sample_plan(config, args.topology[0] if args.topology else None, max(args.devices),
                                    args.persons)
    if args.max_batch:
        status |= print_max_batch(config, args.topology[0], args.persons)
    return status


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
              f"{p.roofline.flops / 1e12:>10.2f} {p.roofline.seconds:>11.3f} {p.compile_seconds:>9.0f} "
              f"{host_peak_rss_bytes() / GIB:>8.1f}", flush=True)
    print("(GiB per chip; TFLOP and s/step per chip: the compiler's cost analysis and roofline time, completed for "
          "the kernels it does not cost (training/roofline.py); an estimate, not a measurement)")
    return fits_all


def print_tpu_train_estimates(config, topologies: list[str], per_device_batch: int = 1) -> None:
    """Per-chip figures of the training step on each TPU topology without compiling it: the exact state and
    batch, the parts of ``peak_law.StepParts`` and the peak ``peak_law.PEAK_LAW`` estimates from them."""
    from realisid_jax.training.aot import device_hbm_bytes
    from realisid_jax.training.peak_law import PEAK_LAW, step_parts

    print(f"\ntraining step, {config.train.resolution}px, batch {per_device_batch} per device, FSDP over the slice: "
          f"ESTIMATED per-chip peak (not compiled; training/peak_law.py):")
    print(f"{'topology':>10} {'devices':>7} {'weights+state':>13} {'batch':>6} {'residuals':>9} {'gradients':>9} "
          f"{'largest block':>13} {'est. temporaries':>16} {'est. peak':>9} {'HBM':>5}  {'fits (est.)':<12}")
    for topology in topologies:
        devices = _tpu_devices(topology)
        parts = step_parts(config, len(devices), per_device_batch=per_device_batch, devices=devices)
        peak, hbm = PEAK_LAW.peak_bytes(parts), device_hbm_bytes(devices)
        print(f"{topology:>10} {len(devices):>7} {parts.state_bytes / GIB:>13.2f} {parts.batch_bytes / GIB:>6.2f} "
              f"{parts.residual_bytes / GIB:>9.2f} {parts.gradient_bytes / GIB:>9.2f} {parts.block_bytes / GIB:>13.2f} "
              f"{PEAK_LAW.temp_bytes(parts) / GIB:>16.2f} {peak / GIB:>9.2f} {hbm / GIB:>5.0f}  "
              f"{'fits' if peak <= hbm else 'does not fit':<12}", flush=True)
    print(f"(GiB per device. weights+state and batch: exact; the peak is an estimate from the parts, whose law "
          f"was fitted on TPU compiles of SDXL's widths cut in depth and resolution and is off by up to "
          f"{100 * PEAK_LAW.check_error:.1f} % on the compiles left out of the fit: python -m bench.train_peak)")


def _sample_row(plan, chip) -> str:
    """One plan's figures per chip: weights and temporaries of the step with the ID, the peak, TFLOP per image and,
    on TPU, the estimated seconds per image (roofline), images/s per chip, the chip-peak bound and their ratio."""
    d = plan.programs["denoise"]
    if chip is None:  # XLA:CPU: memory and FLOPs only
        flops = plan.per_image(lambda f: f["flops"])
        timing = f"{'-':>9} {'-':>10} {'-':>9} {'-':>6}"
    else:
        flops = plan.per_image(lambda f: f["roofline"].flops)
        seconds = plan.per_image(lambda f: f["roofline"].seconds)
        bound = flops / (chip.peak_flops * plan.num_devices)
        timing = (f"{seconds:>9.3f} {1 / (seconds * plan.num_devices):>10.3f} {bound:>9.3f} "
                  f"{seconds / bound:>6.2f}")
    compile_s = sum(f["compile_seconds"] for f in plan.programs.values())
    return (f"{d['argument_bytes'] / GIB:>7.2f} {d['temp_bytes'] / GIB:>11.2f} {plan.peak_bytes / GIB:>7.2f} "
            f"{flops / 1e12:>12.2f} {timing} {compile_s:>9.0f}")


def _print_programs(plan) -> None:
    """Each program's figures per chip: per step for the denoising phases, per batch for the decode."""
    for name, f in plan.programs.items():
        cost = f.get("roofline")
        flops, seconds = (cost.flops, f"{cost.seconds:.4f} s") if cost else (f["flops"], "-")
        unit = "batch" if name == "decode" else "step"
        print(f"      {name:<18} {flops / 1e12:8.3f} TFLOP/{unit}  {seconds}/{unit}  peak {f['peak_bytes'] / GIB:.2f} GiB  "
              f"compiled in {f['compile_seconds']:.0f} s", flush=True)


_SAMPLE_HEADER = (f"{'weights':>7} {'temporaries':>11} {'peak':>7} {'TFLOP/image':>12} {'s/image':>9} "
                  f"{'images/s':>10} {'bound s':>9} {'ratio':>6} {'compile s':>9}")
_SAMPLE_NOTE = ("(GiB per chip: weights and temporaries of a step with the ID, the peak over every program. "
                "TFLOP per image: every step and the decode, "
                "the compiler's cost analysis plus the kernels it does not cost (splash) estimated from their "
                "operands; s/image: the compiler's roofline time (each op at the chip's peak FLOP/s or HBM "
                "bandwidth) plus those kernels' at the same peaks, an estimate, not a measurement; images/s per "
                "chip; bound: TFLOP per image at the chip's bf16 peak; ratio = s/image / bound. "
                "training/roofline.py)")


def print_sample_plan(config, topology: str | None, cpu_devices: int, persons: list[int]) -> int:
    """Sampling one image with each of ``persons`` on 1, 2, 4, ... chips of ``topology`` (weights FSDP-sharded)
    until it fits a chip's HBM; without a topology on ``cpu_devices`` simulated CPU devices (no HBM to
    compare). Returns 1 if it fits no slice of the topology."""
    import jax

    from realisid_jax.realisid.pipeline import id_start_step
    from realisid_jax.training.aot import host_peak_rss_bytes, sample_plan
    from realisid_jax.training.roofline import device_chip

    devices = _tpu_devices(topology) if topology else jax.devices()[:cpu_devices]
    chip = device_chip(devices) if topology else None
    s = config.sampling
    status = 0
    for k in persons:
        print(f"\nsampling {s.height}x{s.width}, 1 image, {k} person{'s' if k > 1 else ''}, {s.num_inference_steps} "
              f"steps, the ID from step {id_start_step(s.id_start_fraction, s.num_inference_steps)} "
              f"({topology or 'simulated CPU devices'}):")
        print(f"{'chips':>5} {'HBM':>5}  {'fits':<12} {_SAMPLE_HEADER} {'host GiB':>8}")
        n = 1
        while n <= len(devices):
            try:
                plan = sample_plan(config, devices[:n], persons=k)
            except Exception as error:  # noqa: BLE001 - libtpu's XlaRuntimeError; anything else is re-raised
                if chip is None or "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                print(f"{n:>5} {chip.hbm_bytes / GIB:>5.0f}  does not fit: {_compiler_refusal(error)}", flush=True)
                n *= 2
                continue
            fits = "-" if chip is None else ("fits" if plan.peak_bytes <= chip.hbm_bytes else "does not fit")
            print(f"{n:>5} {(chip.hbm_bytes if chip else 0) / GIB:>5.0f}  {fits:<12} {_sample_row(plan, chip)} "
                  f"{host_peak_rss_bytes() / GIB:>8.1f}", flush=True)
            _print_programs(plan)
            if fits == "fits":
                print(f"smallest slice that samples: {n} chip{'s' if n > 1 else ''} of {topology}")
                break
            n *= 2
        else:
            status = 0 if chip is None else 1
    print(_SAMPLE_NOTE)
    return status


def print_max_batch(config, topology: str, persons: list[int]) -> int:
    """The largest batch of images one chip of ``topology`` samples, per number of ``persons``
    (``aot.max_batch``: every compile printed as it ends)."""
    from realisid_jax.training.aot import host_peak_rss_bytes, max_batch
    from realisid_jax.training.roofline import device_chip

    devices = _tpu_devices(topology)[:1]
    chip = device_chip(devices)
    s = config.sampling
    print(f"\nlargest batch on one chip of {topology} ({chip.hbm_bytes / GIB:.0f} GiB HBM), {s.height}x{s.width}, "
          f"{s.num_inference_steps} steps:")
    print(f"{'persons':>7} {'batch':>5} {'fits':<12} {_SAMPLE_HEADER} {'host GiB':>8}")
    status = 0
    for k in persons:
        def show(batch, plan, k=k):
            if plan is None:
                print(f"{k:>7} {batch:>5} does not fit", flush=True)
            elif "decode" not in plan.programs:  # the search's step alone
                print(f"{k:>7} {batch:>5} {'step fits':<12} {plan.peak_bytes / GIB:>29.2f} peak of the step with the ID",
                      flush=True)
            else:
                print(f"{k:>7} {batch:>5} {'fits':<12} {_sample_row(plan, chip)} {host_peak_rss_bytes() / GIB:>8.1f}",
                      flush=True)

        batch, _ = max_batch(config, devices, persons=k, on_plan=show)
        print(f"largest batch with {k} person{'s' if k > 1 else ''}: {batch}", flush=True)
        status |= batch == 0
    print(_SAMPLE_NOTE)
    return int(status)
