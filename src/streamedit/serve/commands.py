"""`streamedit serve`: the click command (imports aiohttp/aiortc only when it runs)."""

from __future__ import annotations

import logging

import click

from ..errors import StreameditError
from .runtime import engine_choice_options, live_model_options

SERVE_EXTRA = "pip install 'streamedit[serve]' (aiohttp, aiortc)"


def _need_server_deps():
    try:
        import aiohttp  # noqa: F401
        import aiortc  # noqa: F401
    except ImportError as exc:
        raise StreameditError(f"'streamedit serve' needs {exc.name}: {SERVE_EXTRA}") from None


def _wxh(value: str) -> tuple[int, int]:
    """'WIDTHxHEIGHT' -> (height, width)."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise click.BadParameter(f"expected WIDTHxHEIGHT, e.g. 1920x1080, got {value!r}") from None
    return h, w


def _resolution(value: str) -> int:
    h, w = _wxh(value)
    return w * h


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but loopback requires the access token.")
@click.option("--port", default=7860, show_default=True, type=click.IntRange(0, 65535))
@live_model_options
@click.option("--token", default=None, help="Access token (generated and printed when binding off-localhost).")
@click.option("--prompt", default="oil painting", show_default=True, help="Initial instruction of new sessions.")
@click.option("--size", default=256, show_default=True, type=int,
              help="Default processing size: the long side (the input's aspect is kept, short side rounded to 32).")
@click.option("--crop", is_flag=True, help="Centre-crop frames to a square (size x size) instead.")
@click.option("--max-size", default=512, show_default=True, type=int, help="Largest size a page may ask for.")
@click.option("--max-sessions", default=None, type=click.IntRange(1, 64),
              help="Concurrent sessions; more are refused (HTTP 503). Default: with the shared engine on CUDA, "
                   "as many as get --target-fps each (measured at start-up); else 2 (with --ray: per replica).")
@click.option("--target-fps", default=24.0, show_default=True, type=click.FloatRange(1, 240),
              help="Frame rate per session the measured --max-sessions default is derived for.")
@click.option("--max-batch", default=8, show_default=True, type=click.IntRange(1, 64),
              help="Shared engine: largest batch (buckets 1, 2, 4, ... up to it, each with its CUDA graphs).")
@click.option("--prepare-input", "prepare_inputs", multiple=True, default=("640x480",), show_default=True,
              help="Shared engine: input frame size(s) (WxH) whose working size is compiled and captured before "
                   "the port opens (the page asks the camera for 640x480). Repeatable.")
@click.option("--max-resolution", default="1920x1080", show_default=True, help="Largest input frame accepted.")
@click.option("--ice-host", "ice_hosts", multiple=True, help="Local address(es) for WebRTC media "
              "(default: every interface). Repeatable.")
@click.option("--ice-server", "ice_urls", multiple=True, metavar="URL",
              help="STUN/TURN server for both ends (stun:HOST[:PORT], turn:HOST[:PORT][?transport=udp|tcp], "
                   "turns:...), so a server behind NAT can be reached; the page reads them from /ice-servers. "
                   "Repeatable.")
@click.option("--turn-user", default=None, help="--ice-server: the TURN servers' user name.")
@click.option("--turn-password", default=None, envvar="STREAMEDIT_TURN_PASSWORD",
              help="--ice-server: the TURN servers' password (or STREAMEDIT_TURN_PASSWORD). The page gets it too: "
                   "prefer short-lived TURN credentials.")
@click.option("--cpu-threads", type=click.IntRange(1, 512), default=None,
              help="torch threads when running on CPU (default: half the cores; the rest encode/decode video).")
@click.option("--certfile", type=click.Path(exists=True, dir_okay=False), default=None,
              help="TLS certificate (HTTPS): browsers give camera access only to https or localhost pages.")
@click.option("--keyfile", type=click.Path(exists=True, dir_okay=False), default=None, help="TLS private key.")
@engine_choice_options
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS|auto]",
              help="Serve on a Ray cluster (docs/scale-out.md): a CPU ingress and replicas of --max-sessions "
                   "sessions each. Needs streamedit[ray].")
@click.option("--replicas", default="1", show_default=True, metavar="N|MIN-MAX",
              help="--ray: replica count, or MIN-MAX to autoscale on ongoing sessions.")
@click.option("--ray-gpus", type=click.FloatRange(0), default=None, help="--ray: GPUs per replica (default 1; "
              "0 with --device cpu).")
@click.option("--drain", type=click.FloatRange(0), default=60.0, show_default=True, metavar="SECONDS",
              help="--ray: how long a replica being scaled down keeps its open sessions (Ray stops the newest "
                   "replica, busy or not) before they are ended.")
def serve_command(host, port, model, revision, device, dtype, lllite, steps, te_size, token, prompt, size, crop,
                  max_size, max_sessions, target_fps, max_batch, prepare_inputs, max_resolution, ice_hosts,
                  ice_urls, turn_user, turn_password, cpu_threads, certfile, keyfile, shared_engine, preset,
                  ray_address, replicas, ray_gpus, drain):
    """Serve a web page that stylizes the browser's camera (or a video file) live over WebRTC."""
    _need_server_deps()
    from .network import parse_ice_servers

    try:
        ice_servers = parse_ice_servers(list(ice_urls), turn_user, turn_password) or None
    except ValueError as exc:
        raise click.UsageError(f"--ice-server: {exc}") from None
    if ray_address is not None:  # the scale package sits above this one: reached by name (scale/__init__.py)
        import importlib

        server = {"prompt": prompt, "size": size, "crop": crop, "max_size": max_size,
                  "max_input_pixels": _resolution(max_resolution), "ice_hosts": list(ice_hosts) or None,
                  "ice_servers": ice_servers}
        importlib.import_module("streamedit.scale.serve_cli").run(
            ray_address, host=host, port=port, token=token, replicas=replicas, gpus=ray_gpus, slots=max_sessions or 2,
            model=model, revision=revision, device=device, dtype=dtype, lllite=lllite, steps=steps, te_size=te_size,
            shared=shared_engine is not False, threads=cpu_threads, server=server, drain_s=drain)
        return
    from ..config import check_prompt
    from .runtime import check_lllite, load_runtime, set_cpu_threads, start_engine
    from .server import Server, ServerConfig, is_loopback, new_token
    from .shared import choose_engine

    if token is not None and len(token) < 8:
        raise click.UsageError("--token must be at least 8 characters")
    if bool(certfile) != bool(keyfile):
        raise click.UsageError("--certfile and --keyfile go together")
    if not 64 <= size <= max_size or size % 32:
        raise click.UsageError(f"--size must be a multiple of 32 between 64 and --max-size ({max_size}), got {size}")
    try:
        prompt = check_prompt(prompt)
    except ValueError as exc:
        raise click.UsageError(f"--prompt: {exc}") from None
    frame_sizes = [(size, size)] if crop else [_wxh(v) for v in prepare_inputs]
    generated = False
    if token is None and not is_loopback(host):
        token, generated = new_token(), True
    check_lllite(lllite)
    if shared_engine is False:  # before the model loads: a contradiction is a usage error
        choose_engine(False, shared_engine, preset)
    click.echo(f"loading {model} ...", err=True)
    models = load_runtime(model, device, dtype, revision)
    threads = set_cpu_threads(models, cpu_threads)
    if threads:
        click.echo(f"running on CPU with {threads} torch thread(s)", err=True)
    from click.core import ParameterSource

    given = click.get_current_context().get_parameter_source("te_size") is ParameterSource.COMMANDLINE
    factory, max_sessions = start_engine(models, shared=shared_engine, preset=preset, steps=steps, lllite=lllite,
                                         te_size=te_size if given else None, size=size, max_batch=max_batch,
                                         frame_sizes=frame_sizes, max_sessions=max_sessions, target_fps=target_fps,
                                         echo=lambda msg: click.echo(msg, err=True))
    config = ServerConfig(host=host, port=port, token=token, prompt=prompt, size=size, crop=crop, max_size=max_size,
                          max_sessions=max_sessions, max_input_pixels=_resolution(max_resolution),
                          ice_hosts=list(ice_hosts) or None, ice_servers=ice_servers,
                          model_name=getattr(models, "source", "") or model)
    server = Server(config, factory)
    ssl_context = None
    if certfile:
        import ssl

        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(certfile, keyfile)
    scheme = "https" if ssl_context else "http"
    shown = "localhost" if is_loopback(host) else ("<this-machine's-address>" if host in ("0.0.0.0", "::") else host)
    url = f"{scheme}://{shown}:{port}/" + (f"?token={token}" if token else "")
    if generated:
        click.echo(f"access token (generated): {token}", err=True)
    if not is_loopback(host) and not ssl_context:
        click.echo("note: over plain http, browsers on other machines allow no camera, only a video file; "
                   "use --certfile/--keyfile for camera access", err=True)
    click.echo(f"streamedit serve: open {url}", err=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from aiohttp import web

    try:
        web.run_app(server.app(), host=host, port=port, ssl_context=ssl_context, print=None,
                    access_log=None, handle_signals=True)
    finally:
        factory.close()  # the shared engine, if any: its thread, the adapter patch, its memory
