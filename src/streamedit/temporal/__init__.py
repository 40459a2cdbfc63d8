"""Temporal consistency: the ControlNet-LLLite adapter fed by the flow-warped previous output.

``adapter.py`` (the adapter and its compile-friendly inference path, apply/remove), ``hooks.py``
(which U-Net Linears it hooks), ``checkpoint.py`` (file formats), ``cond.py`` (every hook's
conditioning CNN as a few GEMMs), ``conditioner.py`` (flow, warp, scene cuts, refresh planning),
``attach.py`` (the engine's adapter from its config).
"""

from .adapter import LLLiteAdapter, LLLiteConfig, apply_lllite, remove_lllite
from .attach import adapter_path, attach_adapter
from .conditioner import FARNEBACK, CondPlan, SceneCutDetector, TemporalConditioner, farneback, warp, warp_output
from .hooks import HOOK_SUBSETS, hook_sites, select_hooks
