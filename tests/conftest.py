import logging

import numpy as np
import pytest
import torch

from streamedit import load_models

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)

# The tiny random U-Net makes denormal floats for some noise draws: convs 20x slower on CPU. Flushed for the whole
# test process, set here before torch starts its threads (they inherit it), so no test depends on the order
# the files run in. A fresh process has it off: compare against one only from another fresh process.
torch.set_flush_denormal(True)


@pytest.fixture(scope="session")
def tiny_models():
    return load_models("random:tiny", device="cpu", dtype=torch.float32)


@pytest.fixture()
def frames():
    """Smooth moving content (random noise would make every frame look alike to a tiny model)."""
    yy, xx = np.mgrid[0:64, 0:64]
    out = []
    for t in range(10):
        r = 127 + 120 * np.sin((xx + 3 * t) / 7.0)
        g = 127 + 120 * np.cos((yy - 2 * t) / 9.0)
        b = 255.0 * ((xx + yy + 5 * t) % 64) / 64
        out.append(np.stack([r, g, b], -1).astype(np.uint8))
    return out


async def close_clients(cams, client) -> None:
    """The end of a serve test: close each WebRTC test client (serve.client.Client), then the HTTP test client."""
    for cam in cams:
        await cam.close()
    await client.close()


def run_closing(run, coro, factory) -> None:
    """Run a serve test's coroutine with its file's ``run`` (and time limit), then close the engine factory."""
    try:
        run(coro)
    finally:
        factory.close()
