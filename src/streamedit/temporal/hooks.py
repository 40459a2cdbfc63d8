"""Where the LLLite adapter attaches: the U-Net's hooked Linears (sites), subsets and resolution levels."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import StreameditError

HOOK_RE = re.compile(r"transformer_blocks\.\d+\.(attn1\.to_[qkv]|attn2\.to_q)$")


def hook_sites(unet: torch.nn.Module) -> list[str]:
    """Names of the Linear layers the LLLite adapter hooks, in module order."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and HOOK_RE.search(n)]


def hook_split(unet: torch.nn.Module) -> dict[str, int]:
    names = hook_sites(unet)
    return {part: sum(n.startswith(part) for n in names) for part in ("down", "mid", "up")}


HOOK_SUBSETS = ("all", "down", "mid", "up")


def select_hooks(unet: nn.Module, hooks: str | list[str] | tuple[str, ...] = "down") -> list[str]:
    """Hook names for ``all``/``down``/``mid``/``up``, a list of names or a comma-separated string of
    them (the CLI's ``--hooks``), returned in U-Net order."""
    sites = hook_sites(unet)
    if isinstance(hooks, str):
        if hooks in HOOK_SUBSETS:
            return sites if hooks == "all" else [n for n in sites if n.startswith(hooks)]
        hooks = [h.strip() for h in hooks.split(",") if h.strip()]
    wanted = set(hooks)
    unknown = sorted(wanted - set(sites))
    if unknown:
        raise StreameditError(f"{len(unknown)} LLLite hook name(s) are not hook sites of this U-Net, "
                              f"e.g. {unknown[0]!r} (subsets: {', '.join(HOOK_SUBSETS)})")
    return [n for n in sites if n in wanted]


def hook_level(unet: nn.Module, name: str) -> int:
    """Resolution level of a hook: 0 = latent resolution, +1 per 2x downsampling before its block."""
    down = list(unet.down_blocks)
    n_down = [getattr(b, "downsamplers", None) is not None for b in down]
    m = re.match(r"(down_blocks|up_blocks)\.(\d+)\.|mid_block\.", name)
    if m is None:
        raise StreameditError(f"cannot place LLLite hook {name!r} in the U-Net (not in down/mid/up blocks)")
    if m.group(1) == "down_blocks":
        return sum(n_down[: int(m.group(2))])
    level = sum(n_down)
    if m.group(1) == "up_blocks":
        ups = list(unet.up_blocks)[: int(m.group(2))]
        level -= sum(getattr(b, "upsamplers", None) is not None for b in ups)
    return level
