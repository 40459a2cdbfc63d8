"""An opt-in record of what a :class:`~streamedit.engine.stream.StreamEngine` computed for its first batches:
the starting noise, the text embeddings the U-Net read and the final latents, per real frame.

``bench`` (bench/agreement.py) compares these between the row's engine and eager reference engines fed the
same frames: decoded pixels of random weights are near black, the embeddings and latents still carry signal.
With ``noise`` given, the engine starts those batches from that noise instead of its own draw, so a
reference engine in another dtype sees exactly the row's inputs.

The probe only clones tensors the engine computed anyway (and copies them to the host when the batch is
handed out): with it on or off, the outputs are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ProbeRecord:
    """One batch: ``noise`` for every batch row (what a replay feeds back); the rest per real frame. A frame
    the similarity filter skipped re-emits an earlier output: it carries that frame's embeddings and latents."""
    index: int  # slot: the engine's n-th batch
    noise: torch.Tensor | None  # (B, C, h, w) on the host, the engine's dtype; None: nothing launched
    embeds: torch.Tensor  # (n, tokens, hidden) on the host, the engine's dtype
    mask: torch.Tensor | None  # (n, tokens) 1/0 for the padded TE view; None: unpadded
    latents: torch.Tensor  # (n, C, h, w) on the host, the engine's dtype


@dataclass
class EngineProbe:
    """Set as ``engine.probe`` before the engine's first batch; ``records`` fill as batches are handed out."""
    batches: int  # the engine's first `batches` batches are recorded (over all its run() calls)
    noise: list[torch.Tensor] | None = None  # per slot: starting noise to use instead of drawing
    records: list[ProbeRecord] = field(default_factory=list)
    _claimed: int = 0
    _last: tuple | None = None  # (embeds, mask, latents) of the last computed frame

    def claim(self) -> int | None:
        """The engine encodes a batch: its slot (0, 1, ... in stream order), or None once ``batches`` are taken."""
        if self._claimed >= self.batches:
            return None
        self._claimed += 1
        return self._claimed - 1

    def replay_noise(self, index: int) -> torch.Tensor | None:
        if self.noise is None or index >= len(self.noise):
            return None
        return self.noise[index]

    def add(self, index: int, count: int, skip: list[bool] | None, noise, embeds, mask, latents) -> None:
        """A batch handed out: device tensors (``embeds``/``mask``/``latents`` None when nothing was launched)."""
        rows = []
        for i in range(count):
            if latents is None or (skip and skip[i]):
                if self._last is None:  # cannot happen: the first frame is never skipped
                    raise RuntimeError("probe: a skipped frame before any computed one")
                rows.append(self._last)
            else:
                self._last = (embeds[i].cpu(), None if mask is None else mask[i].cpu(), latents[i].cpu())
                rows.append(self._last)
        e, m, lat = zip(*rows)
        self.records.append(ProbeRecord(index, None if noise is None else noise.cpu(), torch.stack(e),
                                        None if m[0] is None else torch.stack(m), torch.stack(lat)))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(embeds, mask, latents) of every recorded frame, in order."""
        recs = sorted(self.records, key=lambda r: r.index)
        mask = None if recs[0].mask is None else torch.cat([r.mask for r in recs])
        return torch.cat([r.embeds for r in recs]), mask, torch.cat([r.latents for r in recs])
