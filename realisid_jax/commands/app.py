"""``realisid app``: the main job as a local web page (Gradio) on http://127.0.0.1:7860.

Models are loaded once, at start; without ``--base`` it serves the embedded default (the config's random
weights: noise, not faces) as ``realisid sample`` does. No share link, no analytics: nothing leaves the machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
import tempfile

from realisid_jax.commands.arguments import finite_float
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
    p.add_argument("--auth", type=user_password, default=None, metavar="USER:PASSWORD",
                   help="the page asks for this user name and password (Gradio's login) before anything else")
    p.add_argument("--max-upload-mb", type=upload_limit, default=25, metavar="MB",
                   help="largest photo upload, megabytes (default: 25); larger ones are refused as they arrive")
    p.set_defaults(func=run)


def run(args) -> int:
    from realisid_jax.app.metadata import WEIGHT_FLAGS
    from realisid_jax.app.page import build_page, launch
    from realisid_jax.app.request import Studio
    from realisid_jax.commands.sample import DEFAULT_PROMPT

    config = load_config(args.config, args.config_overrides)
    _warn_open_host(args.host, args.auth is not None)
    enable_compilation_cache()
    pipeline = build_pipeline(config, args)
    weights = {k: getattr(args, k, None) for k in WEIGHT_FLAGS}
    out = args.out or tempfile.mkdtemp(prefix="realisid_app_")
    studio = Studio(pipeline, config_name=args.config, config_overrides=args.config_overrides, weights=weights,
                    out_dir=out)
    page = build_page(studio, default_prompt=DEFAULT_PROMPT, notice="" if args.base else RANDOM_WEIGHTS_NOTE,
                      max_upload_mb=args.max_upload_mb)
    login = f", login as {args.auth[0]}" if args.auth else ""
    print(f"serving on http://{args.host}:{args.port} (images are written to {out}/{login}; Ctrl-C stops)",
          flush=True)
    launch(page, host=args.host, port=args.port, out=out, auth=args.auth, max_upload_mb=args.max_upload_mb)
    return 0


def user_password(text: str) -> tuple[str, str]:
    """``USER:PASSWORD`` (``--auth``), split at the first ``:``; neither part may be empty."""
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise argparse.ArgumentTypeError("give USER:PASSWORD, both non-empty")
    return user, password


def upload_limit(text: str) -> float:
    """Megabytes above 0 (``--max-upload-mb``)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {value:g}")
    return value


def _warn_open_host(host: str, login: bool = False) -> None:
    """One warning (stderr) when ``host`` is not a loopback address: without ``--auth`` anyone who can reach
    this machine on that network can use the page (and the GPU); with it, the password crosses that network
    unencrypted (plain HTTP)."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        loopback = False
    if loopback:
        return
    if login:
        print(f"warning: --host {host}: the page asks for the --auth login, but over plain HTTP: the password "
              f"crosses that network unencrypted", file=sys.stderr)
    else:
        print(f"warning: --host {host}: anyone who can reach this machine on that network can use the page (it "
              f"has no login); the default 127.0.0.1 serves this machine only", file=sys.stderr)
