"""LLLite checkpoint formats (safetensors), auto-detected at load.

* ``streamedit`` (written by :meth:`LLLiteAdapter.save`): keys ``<hook name>.<part>``, e.g.
  ``down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q.mid.0.weight``; metadata
  ``format=streamedit-lllite`` plus ``cond_emb_dim``, ``mlp_dim``, ``cond_size``, ``vae_scale``,
  ``dropout``, ``hooks`` (JSON list) and ``flow`` (the flow convention, temporal/conditioner.py; files written
  before it existed are ``backward``).
* ``dreamlite-lllite`` (otanl/dreamlite-lllite ``LLLiteController.state_dict()``): keys
  ``modules_dict.<hook name with '.' -> '__'>.<part>``; metadata (if any) carries ``cond_emb_dim``,
  ``mlp_dim``, ``cond_type``, ``step``, ``model``, but not the cond image size. This is the layout of
  the paper's temporal adapter (otanl/dreamlite-stream ``temporal_lllite_step001440.safetensors``),
  trained with the ``forward`` flow convention: such files load with it.
* ``kohya`` (sd-scripts ``ControlNetLLLite``, applied to diffusers names): keys
  ``lllite_unet_<hook name with '.' -> '_'>.<part>``.

``<part>`` is ``conditioning1.<i>``, ``down.0``, ``mid.0`` or ``up.0`` + ``.weight``/``.bias`` in all three.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..errors import StreameditError
from .hooks import hook_level, hook_sites, select_hooks

log = logging.getLogger(__name__)

FORMAT = "streamedit-lllite"
_PART = re.compile(r"\.((?:conditioning1\.\d+|down\.0|mid\.0|up\.0)\.(?:weight|bias))$")


def save_adapter(adapter, path: str | Path) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for hook, m in adapter.items():
        for part, t in m.state_dict().items():
            tensors[f"{hook}.{part}"] = t.detach().to("cpu").contiguous()
    c = adapter.config
    meta = {"format": FORMAT, "cond_emb_dim": str(c.cond_emb_dim), "mlp_dim": str(c.mlp_dim),
            "cond_size": str(c.cond_size), "vae_scale": str(c.vae_scale), "dropout": json.dumps(c.dropout),
            "hooks": json.dumps(list(c.hooks)), "flow": c.flow}
    try:
        save_file(tensors, str(path), metadata=meta)
    except OSError as exc:
        raise StreameditError(f"could not write LLLite checkpoint {str(path)!r}: {exc.strerror or exc}") from exc


def read_checkpoint(path: str | Path, unet) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict, str, int]:
    """-> ({hook: {part: (file key, tensor)}}, metadata, layout name, count of keys naming no hook of ``unet``)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StreameditError(f"LLLite checkpoint {str(path)!r} not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for truncated/garbage files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StreameditError(f"could not read LLLite checkpoint {str(path)!r} (not a valid safetensors file: "
                              f"{first})") from exc
    if not raw:
        raise StreameditError(f"LLLite checkpoint {str(path)!r} holds no tensors")
    if meta.get("format") == FORMAT:
        layout = "streamedit"
    elif all(k.startswith("modules_dict.") for k in raw):
        layout = "dreamlite-lllite"
    elif all(k.startswith("lllite_unet_") for k in raw):
        layout = "kohya"
    else:
        layout = "streamedit"  # plain <hook>.<part> keys without our metadata
    kohya = {"lllite_unet_" + h.replace(".", "_"): h for h in hook_sites(unet)} if layout == "kohya" else {}
    out: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = 0
    for key, t in raw.items():
        m = _PART.search(key)
        if m is None:
            raise StreameditError(f"LLLite checkpoint {str(path)!r}: unrecognised key {key!r} "
                                  "(not a streamedit, dreamlite-lllite or kohya LLLite file)")
        stem = key[: m.start()]
        if layout == "dreamlite-lllite":
            hook = stem[len("modules_dict."):].replace("__", ".")
        elif layout == "kohya":
            hook = kohya.get(stem)
            if hook is None:
                unknown += 1
                continue
        else:
            hook = stem
        out.setdefault(hook, {})[m.group(1)] = (key, t)
    return out, meta, layout, unknown


def load_adapter(cls, path, unet, hooks, cond_size):
    weights, meta, layout, unknown = read_checkpoint(path, unet)
    name = Path(path).name
    sites = set(hook_sites(unet))
    file_hooks = [h for h in weights if h in sites]
    unknown += sum(len(p) for h, p in weights.items() if h not in sites)
    wanted = select_hooks(unet, hooks) if hooks is not None else select_hooks(unet, file_hooks)
    if not wanted:
        raise StreameditError(f"LLLite checkpoint {name!r} ({layout} layout) has no weights for this U-Net's hooks")
    missing = [h for h in wanted if h not in weights]
    if missing:
        raise StreameditError(f"LLLite checkpoint {name!r} has no weights for {len(missing)} requested hook(s), "
                              f"e.g. {missing[0]!r}")
    skipped = len([h for h in file_hooks if h not in set(wanted)])
    if skipped or unknown:
        extra = f" and {unknown} key(s) matching no hook of this U-Net" if unknown else ""
        log.warning("LLLite checkpoint %s: skipped weights of %d hook(s) outside the requested subset%s",
                    name, skipped, extra)

    sample = weights[wanted[0]]
    dims = _dims(name, sample)
    # Files without our metadata: the finest stride follows from the conv kernels (kernel == stride).
    vae_scale = meta.get("vae_scale") or max(1, _stride(sample) // 2 ** hook_level(unet, wanted[0]))
    cfg = dict(cond_emb_dim=int(meta.get("cond_emb_dim", dims[0])), mlp_dim=int(meta.get("mlp_dim", dims[1])),
               cond_size=cond_size or int(meta.get("cond_size", 512)), vae_scale=int(vae_scale),
               dropout=json.loads(meta["dropout"]) if "dropout" in meta else None,
               flow=meta.get("flow") or ("forward" if layout == "dreamlite-lllite" else "backward"))
    adapter = cls.for_unet(unet, hooks=wanted, **cfg)
    for hook in wanted:
        module = adapter.module_for(hook)
        expected = module.state_dict()
        given = weights[hook]
        for part, (key, t) in given.items():
            if part not in expected:
                raise StreameditError(f"LLLite checkpoint {name!r}: unexpected key {key!r} (the adapter's module "
                                      f"has {', '.join(sorted(expected))}; different cond CNN depth or vae_scale?)")
            if tuple(t.shape) != tuple(expected[part].shape):
                raise StreameditError(f"LLLite checkpoint {name!r}: {key} has shape {tuple(t.shape)} but the "
                                      f"adapter expects {tuple(expected[part].shape)}")
        absent = [p for p in expected if p not in given]
        if absent:
            raise StreameditError(f"LLLite checkpoint {name!r}: missing {hook}.{absent[0]}")
        module.load_state_dict({p: t for p, (_, t) in given.items()})
    return adapter


def _stride(parts: dict) -> int:
    stride = 1
    for part, (_, t) in parts.items():
        if part.startswith("conditioning1.") and part.endswith(".weight") and t.dim() == 4 and t.shape[-1] != 3:
            stride *= t.shape[-1]
    return stride


def _dims(name: str, parts: dict) -> tuple[int, int]:
    """(cond_emb_dim, mlp_dim) from the tensor shapes, for files without metadata."""
    try:
        mlp = parts["down.0.weight"][1].shape[0]
        return parts["mid.0.weight"][1].shape[1] - mlp, mlp
    except KeyError as exc:
        raise StreameditError(f"LLLite checkpoint {name!r}: missing {exc.args[0]!r} weights") from None
