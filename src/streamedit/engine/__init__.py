"""The stream engine: frames -> batches -> side stream (TE + VAE encode) -> main stream (denoise + decode) -> frames.

``stream.py``: :class:`StreamEngine` (batching, prefetch, both host schedules, lifecycle); ``steps.py``: one
batch's steps on the two CUDA streams (encode, generate, hand-out);
``batch.py``: what travels between the stages; ``host.py``: frames to the working size, the low-latency
reader thread; ``similarity.py``: the skip-similar filter. Options: :mod:`streamedit.config`; what it measures: :mod:`streamedit.telemetry`.
"""

from ..config import LOW_LATENCY, EngineConfig, clean_prompt
from .stream import StreamEngine

__all__ = ["StreamEngine", "EngineConfig", "clean_prompt", "LOW_LATENCY"]
