"""Scale-out on Ray (the optional extra ``streamedit[ray]``; docs/scale-out.md).

``stylize --ray``: a long file (or many) cut into shards, one Ray task each (``shards``, ``join``, ``stylize``).
``serve --ray``: Ray Serve deployments, a CPU ingress and GPU replicas that each run the existing server's
sessions (``serve_app``). Ray is imported only here, on first use: ``streamedit`` works without it.

The CLI reaches this package by name (``importlib``), as the command group reaches its lazy commands: it sits
above ``cli`` and ``serve``, whose pieces it wraps.
"""

from __future__ import annotations

import os

from ..errors import StreameditError

INSTALL_HINT = "--ray needs Ray: pip install 'streamedit[ray]'"


def require_ray():
    """The ``ray`` module, or one clear line (exit 2 at the CLI) when the extra is not installed."""
    try:
        import ray
    except ImportError:
        raise StreameditError(INSTALL_HINT) from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` ('auto': the one this node belongs to; 'local' or None: start one
    here), or keep the connection this process already has. Returns ``ray``."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kw = {"include_dashboard": False, "log_to_driver": bool(os.environ.get("STREAMEDIT_DEBUG"))}
    try:
        if address in (None, "", "local"):
            ray.init(num_cpus=num_cpus, **kw)
        else:
            ray.init(address=address, **kw)
    except (ConnectionError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:200]
        raise StreameditError(f"cannot join the Ray cluster at {address!r}: {reason}") from None
    return ray
