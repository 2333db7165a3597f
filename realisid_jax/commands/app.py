"""``realisid app``: the main job as a local web page (Gradio) on http://127.0.0.1:7860.

Models are loaded once, at start; without ``--base`` it serves the embedded default (the config's random
weights: noise, not faces) as ``realisid sample`` does. No share link, no analytics: nothing leaves the machine.
"""

from __future__ import annotations

import ipaddress
import sys
import tempfile

from realisid_jax.commands.weights import (RANDOM_WEIGHTS_NOTE, add_weight_arguments, build_pipeline,
                                           enable_compilation_cache)
from realisid_jax.config import load_config


def register(subparsers) -> None:
    p = subparsers.add_parser("app", help="the main job as a local web page (upload photos, place faces, generate)")
    p.add_argument("--config", default="configs/sdxl.py:tiny", help="config file (default: configs/sdxl.py:tiny)")
    add_weight_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--out", default=None, help="folder for the generated PNGs (default: a temporary folder)")
    p.set_defaults(func=run)


def run(args) -> int:
    from realisid_jax.app.metadata import WEIGHT_FLAGS
    from realisid_jax.app.page import build_page
    from realisid_jax.app.request import Studio
    from realisid_jax.commands.sample import DEFAULT_PROMPT

    config = load_config(args.config, args.config_overrides)
    _warn_open_host(args.host)
    enable_compilation_cache()
    pipeline = build_pipeline(config, args)
    weights = {k: getattr(args, k, None) for k in WEIGHT_FLAGS}
    out = args.out or tempfile.mkdtemp(prefix="realisid_app_")
    studio = Studio(pipeline, config_name=args.config, config_overrides=args.config_overrides, weights=weights,
                    out_dir=out)
    page = build_page(studio, default_prompt=DEFAULT_PROMPT, notice="" if args.base else RANDOM_WEIGHTS_NOTE)
    print(f"serving on http://{args.host}:{args.port} (images are written to {out}/; Ctrl-C stops)", flush=True)
    page.queue().launch(server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
                        show_error=False, allowed_paths=[out], footer_links=[])
    return 0


def _warn_open_host(host: str) -> None:
    """One warning (stderr) when ``host`` is not a loopback address: the page has no login, so anyone who can
    reach this machine on that network can use it (and the GPU)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if not loopback:
        print(f"warning: --host {host}: anyone who can reach this machine on that network can use the page (it has "
              f"no login); the default 127.0.0.1 serves this machine only", file=sys.stderr)
