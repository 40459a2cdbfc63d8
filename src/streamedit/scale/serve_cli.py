"""``streamedit serve --ray``: start the Serve app of ``serve_app`` on a cluster and keep it up until Ctrl-C."""

from __future__ import annotations

import contextlib
import time

import click

from ..errors import StreameditError
from . import connect, require_ray


def _replicas(text: str, slots: int) -> dict:
    """'N' -> a fixed count; 'MIN-MAX' -> Ray's autoscaling_config on ongoing requests (= sessions)."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError
    except ValueError:
        raise StreameditError(f"--replicas must be N or MIN-MAX (MIN <= MAX, MAX >= 1), got {text!r}") from None
    if lo == hi:
        return {"replicas": lo}
    # scale up when replicas average more than 80 % of their slots in use; a replica scaled down (Ray picks the
    # newest, busy or not) drains: its sessions go on until they end or drain_s passes (docs/scale-out.md)
    return {"replicas": None, "autoscaling": {"min_replicas": lo, "max_replicas": hi,
                                              "target_ongoing_requests": max(1.0, 0.8 * slots),
                                              "upscale_delay_s": 5.0, "downscale_delay_s": 120.0}}


def run(address: str, *, host: str, port: int, token: str | None, replicas: str, gpus: float | None, slots: int,
        device: str | None, **replica_kw) -> None:
    ray = require_ray()
    from ..serve.server import is_loopback, new_token

    scaling = _replicas(replicas, slots)
    gpus = (0.0 if device == "cpu" else 1.0) if gpus is None else gpus
    generated = token is None and not is_loopback(host)
    token = new_token() if generated else token
    ours = not ray.is_initialized() and address in (None, "", "local")  # a cluster this process starts
    connect(address)
    from ray import serve

    try:  # from here on, whatever stops the command (Ctrl-C while replicas still load too) ends what it started
        from .serve_app import deployments

        serve.start(http_options={"host": host, "port": port})
        serve.run(deployments(slots=slots, gpus=gpus, token=token, device=device, **scaling, **replica_kw),
                  name="streamedit", route_prefix="/")
        if generated:
            click.echo(f"access token (generated): {token}", err=True)
        url = f"http://{'localhost' if is_loopback(host) else host}:{port}/" + (f"?token={token}" if token else "")
        click.echo(f"streamedit serve --ray: open {url} (Ctrl-C stops the app)", err=True)
        while True:
            time.sleep(3600)
    finally:
        with contextlib.suppress(Exception):  # Serve may not be up yet: that must not hide why we stopped
            serve.delete("streamedit")
        if ours:  # end our cluster now: on Ctrl-C main() leaves by os._exit, past Ray's atexit hook, and the
            # node's agents then outlived the command by up to a minute
            serve.shutdown()
            ray.shutdown()
