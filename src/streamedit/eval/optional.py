"""Model-based metrics (LPIPS, CLIP, RAFT), run only from local weights: never a download, never a hang.

Each needs a local path; :func:`available_metrics` says, in one line per metric, why one cannot run
(no path given, file missing, torchvision or the lpips package absent). Loading errors raise
:class:`~streamedit.errors.StreameditError` with a one-line message, which ``compute_all`` reports as
a skip. Hub ids are never accepted: CLIP loads with ``local_files_only=True`` from a folder.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StreameditError
from .frames import BASE_METRICS, _chunks, _device, _float, as_frames

RAFT_UPDATES = 12  # torchvision's default number of recurrent refinement steps


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> str | None:
    """None when ``module`` imports, else the first line of why not (cached: imports are slow)."""
    try:
        importlib.import_module(module)
        return None
    except Exception as e:  # a broken install (e.g. torchvision built for another torch) counts as missing
        return f"{type(e).__name__}: {e}".splitlines()[0]


def _file_status(path, flag: str, needs: dict[str, str]) -> tuple[bool, str]:
    if not path:
        return False, f"no {flag} given"
    if not Path(path).is_file():
        return False, f"{flag} file not found: {path}"
    for module, why in needs.items():
        err = _import_error(module)
        if err:
            return False, f"{why} ({err})"
    return True, ""


def _lpips_status(path) -> tuple[bool, str]:
    return _file_status(path, "--lpips-weights", {
        "torchvision": "torchvision is not installed; the LPIPS backbones need it",
        "lpips": "the lpips package is not installed (pip install lpips)"})


def _raft_status(path) -> tuple[bool, str]:
    return _file_status(path, "--raft-weights", {"torchvision": "torchvision is not installed; RAFT needs it"})


def _clip_status(path) -> tuple[bool, str]:
    if not path:
        return False, "no --clip-model given"
    if not (Path(path) / "config.json").is_file():
        return False, f"--clip-model must be a local model folder with a config.json: {path}"
    return True, ""


def available_metrics(lpips_weights=None, clip_model=None, raft_weights=None) -> dict[str, tuple[bool, str]]:
    """{metric: (ok, reason)}; reason is "" when ok, else one line saying why the metric is skipped."""
    out = {name: (True, "") for name in BASE_METRICS}
    out["lpips"] = _lpips_status(lpips_weights)
    out["clip"] = _clip_status(clip_model)
    out["raft"] = _raft_status(raft_weights)
    return out


def _u8_frames(frames) -> list[np.ndarray]:
    x = as_frames(frames)
    if x.dtype != torch.uint8:
        x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return list(x.permute(0, 2, 3, 1).cpu().numpy())


# ------------------------------------------------------------------------------------------------ LPIPS
def load_lpips(path, device="cpu"):
    """An ``lpips.LPIPS`` module from a local file, which holds either

    * a full LPIPS state dict (``torch.save(lpips.LPIPS(net=...).state_dict(), PATH)``: trunk + heads), or
    * a torchvision ImageNet backbone state dict (e.g. ``alexnet-owt-7be5be79.pth``), with the linear
      heads then taken from the weights bundled in the lpips package.

    The trunk (alex / vgg / squeeze) is read off the tensors. It is built with ``pnet_rand=True`` so
    that torchvision never tries to download ImageNet weights, then overwritten from the file.
    """
    ok, reason = _lpips_status(path)
    if not ok:
        raise StreameditError(reason)
    import lpips

    sd = torch.load(path, map_location="cpu", weights_only=True)
    conv1 = sd.get("features.0.weight", sd.get("net.slice1.0.weight")) if isinstance(sd, dict) else None
    if conv1 is None:
        raise StreameditError(f"{path}: neither an LPIPS state dict (net.*) nor a torchvision backbone (features.*)")
    net = "squeeze" if any(".squeeze." in k for k in sd) else "alex" if conv1.shape[-1] == 11 else "vgg"
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated pretrained=False
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
    target = model.state_dict()
    if "features.0.weight" in sd:  # torchvision names features.{i}.*, lpips splits them into net.sliceK.{i}.*
        by_suffix = {k.split(".", 2)[2]: k for k in target if k.startswith("net.slice")}
        sd = {by_suffix[k[9:]]: v for k, v in sd.items() if k.startswith("features.") and k[9:] in by_suffix}
    missing = [k for k in target if k.startswith("net.") and k not in sd]
    if missing:
        raise StreameditError(f"{path}: LPIPS-{net} trunk lacks {len(missing)} tensors (e.g. {missing[0]})")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        raise StreameditError(f"{path}: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


@torch.no_grad()
def _lpips_mean(model, a: torch.Tensor, b: torch.Tensor, dev) -> float:
    """Mean LPIPS(a[i], b[i]); a is resized to b's size when they differ."""
    vals = []
    for s, e in _chunks(len(a)):
        p, q = _float(a[s:e], dev), _float(b[s:e], dev)
        if p.shape[-2:] != q.shape[-2:]:
            p = F.interpolate(p, size=q.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
        vals.append(model(p, q, normalize=True).flatten().double().cpu())
    return float(torch.cat(vals).mean())


def lpips_metrics(inputs, outputs, lpips_weights, *, device=None) -> dict:
    """lpips_temporal = mean_t LPIPS(O_t, O_{t+1}) (no motion compensation, so true motion counts too:
    compare with lpips_temporal_input, the same on the inputs); lpips_io = mean_t LPIPS(I_t, O_t)."""
    dev = _device(device, outputs)
    model = load_lpips(lpips_weights, dev)
    x, y = as_frames(inputs), as_frames(outputs)
    return {"lpips_temporal": _lpips_mean(model, y[:-1], y[1:], dev),
            "lpips_temporal_input": _lpips_mean(model, x[:-1], x[1:], dev),
            "lpips_io": _lpips_mean(model, x, y, dev)}


# ------------------------------------------------------------------------------------------------- CLIP
def load_clip(path, device="cpu"):
    """(CLIPModel, tokenizer, image processor) from a local folder. The PIL image-processor backend keeps
    results identical with and without torchvision (and on CPU and GPU machines)."""
    ok, reason = _clip_status(path)
    if not ok:
        raise StreameditError(reason)
    from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

    try:
        model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        proc = AutoImageProcessor.from_pretrained(path, local_files_only=True, backend="pil")
    except (OSError, ValueError, KeyError) as e:
        raise StreameditError(f"cannot load CLIP from {path}: {str(e).splitlines()[0]}") from None
    return model, tok, proc


def _emb(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor
    e = out if isinstance(out, torch.Tensor) else out.pooler_output
    return F.normalize(e.float(), dim=-1)


@torch.no_grad()
def clip_image_embeddings(model, proc, frames, device) -> torch.Tensor:
    """(T, D) unit-norm CLIP image embeddings of the frames."""
    imgs = _u8_frames(frames)
    embs = []
    for s, e in _chunks(len(imgs)):
        pix = proc(images=imgs[s:e], return_tensors="pt")["pixel_values"].to(device)
        embs.append(_emb(model.get_image_features(pixel_values=pix)).cpu())
    return torch.cat(embs)


@torch.no_grad()
def clip_text_embedding(model, tok, text: str, device) -> torch.Tensor:
    """(D,) unit-norm CLIP text embedding; long prompts are cut at the model's context length."""
    t = tok([text], padding=True, truncation=True, return_tensors="pt",
            max_length=model.config.text_config.max_position_embeddings)
    t = {k: v.to(device) for k, v in t.items() if k in ("input_ids", "attention_mask")}
    return _emb(model.get_text_features(**t)).cpu()[0]


def clip_metrics(inputs, outputs, prompt, clip_model, *, device=None) -> dict:
    """Raw cosine similarities in [-1,1] (not the x100 / x2.5 CLIPScore scalings), averaged over frames:
    clip_text (O_t vs prompt), clip_text_input (I_t vs prompt), clip_io (I_t vs O_t) and
    clip_temporal (O_t vs O_{t+1}). The text ones need ``prompt``."""
    dev = _device(device, outputs)
    model, tok, proc = load_clip(clip_model, dev)
    ei, eo = clip_image_embeddings(model, proc, inputs, dev), clip_image_embeddings(model, proc, outputs, dev)
    res = {"clip_io": float((ei * eo).sum(-1).mean())}
    if len(eo) > 1:
        res["clip_temporal"] = float((eo[:-1] * eo[1:]).sum(-1).mean())
    if prompt is not None:
        et = clip_text_embedding(model, tok, prompt, dev)
        res["clip_text"] = float((eo @ et).mean())
        res["clip_text_input"] = float((ei @ et).mean())
    return res


# ------------------------------------------------------------------------------------------------- RAFT
def load_raft(path, device="cpu"):
    """torchvision ``raft_large`` with a state dict from a local file (e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth)."""
    ok, reason = _raft_status(path)
    if not ok:
        raise StreameditError(reason)
    from torchvision.models.optical_flow import raft_large

    model = raft_large(weights=None, progress=False)  # weights=None: nothing is fetched
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, TypeError, AttributeError) as e:
        raise StreameditError(f"{path} is not a raft_large state dict: {str(e).splitlines()[0]}") from None
    return model.to(device).eval()


@torch.no_grad()
def raft_flows(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward flows (n,2,H,W) of the n consecutive pairs of x (n+1,3,H,W) in [0,1].

    One pair at a time: RAFT's all-pairs correlation volume grows with (H*W)^2 / 8^4 per pair.
    Frames are padded (replicate, right/bottom: the pixel grid is unchanged) to sides that are multiples
    of 8 and at least 128, which RAFT's 4-level correlation pyramid needs.
    """
    h, w = x.shape[-2:]
    ph, pw = max(128, -(-h // 8) * 8) - h, max(128, -(-w // 8) * 8) - w
    x = F.pad(x * 2 - 1, (0, pw, 0, ph), mode="replicate")  # RAFT takes [-1,1]
    fws, bws = [], []
    for t in range(len(x) - 1):
        a, b = x[t:t + 1], x[t + 1:t + 2]
        f = model(torch.cat((a, b)), torch.cat((b, a)), num_flow_updates=RAFT_UPDATES)[-1][..., :h, :w]
        fws.append(f[:1])
        bws.append(f[1:])
    return torch.cat(fws), torch.cat(bws)
