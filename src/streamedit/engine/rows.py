"""What a multi-stream batch is made of (engine/multi.py): batch-size buckets, the per-working-size group,
the batch's rows (which stream sits where), and the text embeddings of several prompts stacked in row order."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from ..diffusion.denoiser import Denoiser
from ..telemetry import TickRecord
from ..text.base import TextEncoder

TOKEN_STEP = 64  # compiled: the text sequence is padded to a multiple of this (few graph signatures)
PROMPT_TOKENS = 48  # the fast text encoder's room for a prompt: one sequence length for every prompt


def default_buckets(batch_size: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``batch_size`` (and ``batch_size`` itself)."""
    return tuple(sorted({2 ** i for i in range(batch_size.bit_length()) if 2 ** i <= batch_size} | {batch_size}))


@dataclass
class SizeGroup:
    """What one working size needs: a denoiser per bucket (own CUDA graphs, shared compiled functions), the
    adapter's buffers for this size and which stream's cond embedding each buffer row holds."""
    shape: tuple[int, int]
    denoisers: dict[int, Denoiser]
    owners: list  # buffer row -> (stream id, cond version) of the cond embedding it holds, or None
    buffers: object = None  # LLLiteAdapter.buffer_set()
    cache_key: str | None = None  # compile artifacts to save after its first batch


@dataclass
class RowBatch:
    """One tick's batch on its way: host -> side stream -> main stream -> host."""
    group: SizeGroup
    rows: list  # batch row -> (Stream, Pending, its noise, its CondPlan or None); None for a padding row
    record: TickRecord | None = None
    plans: dict = field(default_factory=dict)  # batch row -> its stream's CondPlan (adapter on)
    device: tuple = ()  # (noise, source, text tensors, frames) from the side stream
    done: torch.cuda.Event | None = None  # the side stream's work is queued before it
    output: torch.Tensor | None = None  # (bucket, H, W, 3) uint8 on the host
    started: torch.cuda.Event | None = None  # timing: before its first side-stream work (BusyClock)
    ready: torch.cuda.Event | None = None  # timing: the output's copy to the host is done

    @property
    def real(self) -> list[tuple[int, object, object]]:
        """(row, stream, pending) of the rows that carry a stream's frame."""
        return [(r, it[0], it[1]) for r, it in enumerate(self.rows) if it is not None]


def assign_rows(owners: list, ids: list[int], bucket: int) -> list[int]:
    """Batch rows for the streams ``ids``: the row a stream had, if its cond embedding is still there (no
    rewrite), else a free one. Rows at or past ``bucket`` are not in this batch."""
    rows, free = [], set(range(bucket))
    for sid in ids:
        mine = next((r for r in range(bucket) if owners[r] and owners[r][0] == sid), None)
        rows.append(mine if mine in free else None)
        free.discard(mine)
    free = sorted(free)
    return [r if r is not None else free.pop(0) for r in rows]


def te_batch(rows: int, buckets: tuple[int, ...] | None) -> int:
    """The TE batch for one prompt's ``rows``: the next of ``buckets`` (the batch sizes captured at start-up),
    so a split of a tick among prompts (3 + 1) never captures a graph for a new batch size mid-stream."""
    return next((b for b in buckets if b >= rows), rows) if buckets else rows


def tick_text(te: TextEncoder, frames: list, prompts: dict[int, str], bucket: int,
              buckets: tuple[int, ...] | None, pad_step: int) -> tuple[tuple[torch.Tensor, ...], int]:
    """The U-Net's text inputs for a tick (call it on the side stream): ``frames`` per batch row, ``prompts``
    per real row. Returns (text tensors, TE calls made). Several prompts that can share one call
    (text/mixed.py) get one, over the real rows padded to a captured batch size; otherwise one call per
    prompt (:func:`stack_text`). ``buckets``: the captured TE batch sizes (None: uncompiled, any size)."""
    order = list(prompts)
    row_prompts = [prompts[r] for r in order]

    def images(rows: list[int], n: int):  # the rows' frames, padded with the first to the TE batch n
        return te.prepare_images([frames[r] for r in rows] + [frames[rows[0]]] * (n - len(rows)))

    if len(set(row_prompts)) > 1 and hasattr(te, "encode_rows") and te.can_mix(row_prompts):
        n = te_batch(len(order), buckets)
        out = te.encode_rows(row_prompts, images(order, n), n)
        where = {r: j for j, r in enumerate(order)}
        pick = [where.get(r, 0) for r in range(bucket)]  # padding rows: the first real row's
        # rows picked by Python indexing and stacked: an index tensor would be a blocking host-to-device copy
        embeds = torch.stack([out[j] for j in pick])
        mask = torch.cat([te.text_mask(row_prompts[j]) for j in pick])  # fixed length: one shape for every prompt
        return _pad_text(embeds, mask, pad_step), 1
    by_prompt: dict[str, list[int]] = {}
    for r in order:
        by_prompt.setdefault(prompts[r], []).append(r)
    te_rows = {p: te_batch(len(rows), buckets) for p, rows in by_prompt.items()}
    batches = {p: images(rows, te_rows[p]) for p, rows in by_prompt.items()}
    return stack_text(te, by_prompt, batches, bucket, pad_step, te_rows), len(by_prompt)


def _pad_text(embeds: torch.Tensor, mask: torch.Tensor, pad_step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and mask zero-padded to a multiple of ``pad_step`` tokens."""
    extra = -embeds.shape[1] % pad_step
    return F.pad(embeds, (0, 0, 0, extra)), F.pad(mask, (0, extra))


def stack_text(te: TextEncoder, by_prompt: dict[str, list[int]], images: dict, bucket: int,
               pad_step: int = 1, te_rows: dict[str, int] | None = None) -> tuple[torch.Tensor, ...]:
    """The U-Net's text inputs for a batch: one TE call per prompt (its rows' frames), the embeddings in row
    order (padding rows: the first row's), zero-padded to the longest and to a multiple of ``pad_step``,
    with a mask where lengths differ or the TE view pads (te_size 256). All one length, no pad: no mask,
    exactly a single-stream engine's inputs. ``te_rows``: a prompt's TE batch when its ``images`` hold more
    frames than its rows (:func:`te_batch`; the outputs past its rows are unused)."""
    embeds, masks = [None] * bucket, [None] * bucket
    for prompt, rows in by_prompt.items():
        out = te.encode(prompt, images[prompt], (te_rows or {}).get(prompt, len(rows)))
        mask = te.text_mask(prompt)
        for j, r in enumerate(rows):
            embeds[r] = out[j]
            masks[r] = mask[0] if mask is not None else out.new_ones(out.shape[1], dtype=torch.long)
    masked = len({e.shape[0] for e in embeds if e is not None}) > 1 or pad_step > 1 or any(
        te.text_mask(p) is not None for p in by_prompt)
    first = next(r for r in range(bucket) if embeds[r] is not None)
    embeds = [e if e is not None else embeds[first] for e in embeds]
    masks = [m if m is not None else masks[first] for m in masks]
    embeds, mask = pad_sequence(embeds, batch_first=True), pad_sequence(masks, batch_first=True)
    if not masked:
        return (embeds,)
    return _pad_text(embeds, mask, pad_step)
