"""One text-encoder call for a batch whose rows have different prompts (the multi-stream engine's ticks).

With one sequence length for every prompt (``prompt_tokens``, text/fast.py) and the image ahead of the prompt
in the edit template, what differs between prompts is only two per-row constants: the token embeddings after
the image and the mask of the prompt's own rows. The 64-token system prefix's K/V, the rotary tables, the
image span and the causal mask are the same for every prompt. So a tick of K streams with K prompts needs one
TE call, not K calls of one row each: this runner keeps ``text`` and ``keep`` per row (a buffer of ``rows``
rows, written in place, so compiled code and CUDA graphs stay valid) and shares the rest. Each row's output
equals the one-prompt runner's for that prompt (rows never attend to each other). Prompts whose shared
constants differ (another template) are reported by :meth:`MixedPromptRunner.can_mix`; the caller then makes
one call per prompt.
"""

from __future__ import annotations

import torch

from .fast import FastTextEncoderRunner

PER_ROW = ("text", "keep")  # the constants that differ between prompts
SHARED = ("keys", "values", "cos", "sin", "mask")


def _equal(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and torch.equal(a, b)


class MixedPromptRunner(FastTextEncoderRunner):
    """:class:`FastTextEncoderRunner` at one sequence length (``prompt_tokens``) with a prompt per row."""

    def __init__(self, models, rows: int, prompt_tokens: int, **kw):
        super().__init__(models, rows, prompt_tokens=prompt_tokens, **kw)
        self.rows = rows
        self._reference: tuple | None = None  # (shared constants, span, n_pad) of the first prompt seen
        self._mixable: dict[str, bool] = {}
        # each row's prompt in the buffers; None: the last full store was a prompt that does not mix
        self._row_prompts: list[str] | None = None

    def set_prompt(self, prompt: str) -> None:
        if prompt == self._prompt:
            return
        super().set_prompt(prompt)
        self._row_prompts = [prompt] * self.rows if self._mixable.get(prompt) else None

    def _store(self, name: str, value):
        if name in PER_ROW:  # every row this prompt's, until encode_rows writes others
            value = value.expand(self.rows, *value.shape[1:]).contiguous()
        super()._store(name, value)

    def _prompt_constants(self, prompt: str):
        values, span, n_pad = super()._prompt_constants(prompt)
        if self._reference is None:
            self._reference = ({k: values[k] for k in SHARED}, span, n_pad)
        shared, ref_span, ref_pad = self._reference
        same = span == ref_span and n_pad == ref_pad and all(_equal(values[k], shared[k]) for k in SHARED)
        self._mixable[prompt] = same
        if same:  # one copy of the prefix K/V and the tables for every prompt that shares them
            values = {**values, **shared}
        return values, span, n_pad

    def can_mix(self, prompts: list[str]) -> bool:
        """Whether these prompts can share one call (computes and keeps each prompt's constants)."""
        for p in dict.fromkeys(prompts):
            self._constants(p)
        return all(self._mixable.get(p, False) for p in prompts)

    @torch.no_grad()
    def encode_rows(self, prompts: list[str], images: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, tokens - prefix, hidden): row ``i`` for ``prompts[i]`` (rows past ``len(prompts)`` keep
        whatever prompt they had: their outputs are for padding). Only for prompts that :meth:`can_mix`. Only
        the rows whose prompt changed are written; the shared constants stay as they are."""
        if not 0 < len(prompts) <= min(batch, self.rows):
            raise ValueError(f"{len(prompts)} prompts for a batch of {batch} (room for {self.rows} rows)")
        if not self.can_mix(prompts):
            raise ValueError("these prompts do not share the TE's constants: encode them one prompt at a time")
        if self._row_prompts is None:  # the buffers hold a prompt that does not mix: the shared part first
            self.set_prompt(prompts[0])
        rows = self._row_prompts
        for r, p in enumerate(prompts):
            if rows[r] != p:
                values = self._constants(p)[0]
                for name in PER_ROW:
                    self.c[name][r].copy_(values[name][0])
                rows[r] = p
        # one prompt in every row is what set_prompt would store: it then has nothing to do
        self._prompt = rows[0] if rows.count(rows[0]) == len(rows) else None
        return self._run(images, batch)

    def release(self) -> None:
        super().release()
        self._reference = None
        self._mixable.clear()
        self._row_prompts = None
