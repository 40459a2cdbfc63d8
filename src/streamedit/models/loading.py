"""Loading DreamLite-mobile + Qwen3-VL: hub ids, local diffusers folders and random builds.

``load_models(source)`` returns :class:`Models`, whose attributes carry the component names of
diffusers' ``DreamLiteMobilePipeline`` (text_encoder, tokenizer, processor, vae, unet, scheduler).
Sources:

* a hub id (``carlofkl/DreamLite-mobile``, revision ``diffusers``) or a local diffusers folder:
  loaded through ``DreamLiteMobilePipeline.from_pretrained``, the path every real user takes;
* ``random:real``: the published architectures with random weights, for speed work;
* ``random:tiny``: the same classes at toy sizes, for tests; ``random:demo``: the demo model's architecture.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DreamLiteMobilePipeline, DreamLiteUNetModel, FlowMatchEulerDiscreteScheduler
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from . import processor as proc
from ..errors import StreameditError

log = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "tokenizer", "processor", "vae", "unet", "scheduler")
DREAMLITE_HUB_ID = "carlofkl/DreamLite-mobile"
DREAMLITE_REVISION = "diffusers"
DEMO_PATH = Path(__file__).parents[1] / "assets" / "demo-model"
DEMO_LLLITE = Path(__file__).parents[1] / "assets" / "demo-lllite.safetensors"  # the demo model's temporal adapter
HOOK_RE = re.compile(r"transformer_blocks\.\d+\.(attn1\.to_[qkv]|attn2\.to_q)$")

_UNET_BLOCKS = dict(
    down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
                      "DreamLiteCrossAttnDownBlock2D"),
    mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
    up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteUpBlock2D"),
    encoder_hid_dim_type="text_proj_rms", addition_embed_type="time", num_kv_heads=1, qk_norm="rms_norm",
    use_sep_conv=True, use_linear_projection=True, in_channels=4, out_channels=4, layers_per_block=2,
)
# Published DreamLite-mobile U-Net: 0.390 B parameters, 108 hook sites (38 down / 16 mid / 54 up).
REAL_UNET = dict(_UNET_BLOCKS, sample_size=128, block_out_channels=(256, 512, 896), attention_head_dim=(4, 8, 14),
                 transformer_layers_per_block=(1, 2, 4), cross_attention_dim=2304, encoder_hid_dim=2048,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=512, ff_mult=3)
TINY_UNET = dict(_UNET_BLOCKS, sample_size=8, block_out_channels=(32, 32, 64), attention_head_dim=(1, 1, 2),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=48, encoder_hid_dim=64,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16, ff_mult=2, layers_per_block=1)
# Qwen3-VL-2B: 2.128 B parameters.
REAL_TE_TEXT = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, intermediate_size=6144, vocab_size=151936, rope_theta=5e6, rms_norm_eps=1e-6,
                    max_position_embeddings=262144,
                    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})
REAL_TE_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[5, 11, 17],
                      num_position_embeddings=2304, in_channels=3)
TINY_TE_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
TINY_TE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                      num_position_embeddings=64, in_channels=3)
TINY_VAE = dict(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))
# The bundled demo model (train/base.py trains it): small enough for >= 4 fps at 256x256 on 2 CPU cores.
DEMO_UNET = dict(_UNET_BLOCKS, sample_size=32, block_out_channels=(64, 128, 192), attention_head_dim=(1, 2, 3),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=192, encoder_hid_dim=128,
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=64, ff_mult=2, in_channels=8,
                 out_channels=8)
DEMO_TE_TEXT = dict(TINY_TE_TEXT, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256,
                    rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})
DEMO_TE_VISION = dict(TINY_TE_VISION, hidden_size=64, intermediate_size=128, out_hidden_size=128,
                      num_position_embeddings=1024)
# No full-resolution blocks: the 256x256 stages are one conv each (the CPU cost of TAESD is there);
# 8 latent channels instead of 4 buy back the reconstruction quality that costs.
DEMO_VAE = dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                num_encoder_blocks=(0, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 0), latent_channels=8)
ARCHITECTURES = {"real": (REAL_UNET, REAL_TE_TEXT, REAL_TE_VISION, {}),
                 "tiny": (TINY_UNET, TINY_TE_TEXT, TINY_TE_VISION, TINY_VAE),
                 "demo": (DEMO_UNET, DEMO_TE_TEXT, DEMO_TE_VISION, DEMO_VAE)}


@dataclass
class Models:
    """The six DreamLiteMobilePipeline components plus what the runtime derives from them."""

    text_encoder: Qwen3VLForConditionalGeneration
    tokenizer: object
    processor: object
    vae: AutoencoderTiny
    unet: DreamLiteUNetModel
    scheduler: FlowMatchEulerDiscreteScheduler
    source: str = ""
    edit_prefix_len: int = proc.QWEN_EDIT_PREFIX_LEN  # TE output tokens dropped (upstream: 64 for Qwen)
    te_image_size: int = 512  # upstream resizes the TE's view of the source to 512x512
    extras: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def pipeline(self) -> DreamLiteMobilePipeline:
        """diffusers' own pipeline over the same components (the reference the engine is tested against)."""
        pipe = DreamLiteMobilePipeline(**{c: getattr(self, c) for c in COMPONENTS})
        pipe.prompt_template_encode_edit_start_idx = self.edit_prefix_len
        return pipe

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers-format folder laid out like the published checkpoint."""
        self.pipeline().save_pretrained(path)
        index_path = Path(path) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen3VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2))


def demo_available() -> bool:
    return (DEMO_PATH / "model_index.json").is_file()


def hook_sites(unet: torch.nn.Module) -> list[str]:
    """Names of the Linear layers the LLLite adapter hooks, in module order."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and HOOK_RE.search(n)]


def hook_split(unet: torch.nn.Module) -> dict[str, int]:
    names = hook_sites(unet)
    return {part: sum(n.startswith(part) for n in names) for part in ("down", "mid", "up")}


def load_models(source: str = "random:tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                revision: str | None = None) -> Models:
    """Load or build the model components on ``device`` in ``dtype`` (see module docstring)."""
    device = torch.device(device)
    if source.startswith("random:") and source[7:] in ARCHITECTURES:
        models = build_random(source[7:], device=device, dtype=dtype)
    elif source == "demo":
        if not demo_available():
            raise StreameditError("the bundled demo model is not installed in this copy of streamedit")
        models = _from_pretrained(str(DEMO_PATH), device, dtype, None)
    elif source.startswith("random:"):
        raise StreameditError(f"unknown model source {source!r}: random builds are "
                              + ", ".join(f"'random:{a}'" for a in ARCHITECTURES))
    else:
        models = _from_pretrained(source, device, dtype, revision)
    models.source = source
    return models


def build_random(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Models:
    """Random weights in the exact published architecture (``real``), the demo one or a toy one (``tiny``)."""
    unet_cfg, text_cfg, vision_cfg, vae_cfg = ARCHITECTURES[arch]
    tokenizer = proc.build_offline_tokenizer()
    if arch != "real":  # the real vocabulary is Qwen's; small builds use the offline tokenizer's
        text_cfg = dict(text_cfg, vocab_size=len(tokenizer))
    te_config = _te_config(tokenizer, text_cfg, vision_cfg)
    torch.manual_seed(seed)
    # Built directly in the target dtype on the target device: no fp32 copy of 2.5 B parameters.
    with torch.device(device), _default_dtype(dtype):
        text_encoder = Qwen3VLForConditionalGeneration(te_config)
        unet = DreamLiteUNetModel(**unet_cfg)
        vae = AutoencoderTiny(**vae_cfg)
    vision = te_config.vision_config
    models = Models(
        text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer,
        processor=proc.build_processor(tokenizer, vision.patch_size, vision.spatial_merge_size),
        vae=vae.eval(), unet=unet.eval(),  # already in dtype (built under it)
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.16, base_image_seq_len=256, max_image_seq_len=4096),
        edit_prefix_len=proc.edit_prefix_len(tokenizer),
    )
    return models


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _te_config(tokenizer, text: dict, vision: dict) -> Qwen3VLConfig:
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)


def _from_pretrained(source: str, device: torch.device, dtype: torch.dtype, revision: str | None) -> Models:
    local = Path(source).expanduser()
    if not local.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise StreameditError(f"unknown model source {source!r}: not a folder, not a hub id (owner/name), "
                                  "not 'random:real' / 'random:tiny' / 'random:demo' / 'demo'")
        if revision is None and source == DREAMLITE_HUB_ID:
            revision = DREAMLITE_REVISION
        local = Path(_hub_snapshot(source, revision))
    # Hub ids and folders load through the same code from here on.
    _check_folder(local)
    source = str(local)
    try:
        # Loaded separately so that machines without torchvision get the image-only processor;
        # with torchvision this is the stock Qwen3VLProcessor of the checkpoint.
        processor = _load_processor(source)
        pipe = DreamLiteMobilePipeline.from_pretrained(source, dtype=dtype, processor=processor)
    except StreameditError:
        raise
    except Exception as exc:  # hub/network/format errors: one clear line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreameditError(f"could not load model {source!r}: {first}") from exc
    check_scheduler(pipe.scheduler)
    pipe.to(device)
    tok = pipe.tokenizer
    # Upstream's 64 is exact for the Qwen tokenizer; other tokenizers are measured.
    prefix = proc.QWEN_EDIT_PREFIX_LEN if len(tok) > 150_000 else proc.edit_prefix_len(tok)
    extras = {}
    meta = local / "streamedit.json"  # written by `streamedit train base`: instructions the model knows
    if meta.is_file():
        try:
            extras = json.loads(meta.read_text())
        except ValueError:
            log.warning("ignoring unreadable %s", meta)
    return Models(**{c: getattr(pipe, c) for c in COMPONENTS}, source=source, edit_prefix_len=prefix, extras=extras)


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler whose steps diffusion/denoiser.py's written-out Euler step does not reproduce.

    The sigmas and timesteps always come from the scheduler's own ``set_timesteps`` (time-shift type,
    Karras / exponential / beta spacing and ``shift_terminal`` included), and the step
    ``x + (s_next - s) * v`` equals ``scheduler.step`` for them (tests/test_scheduler.py). Not for
    ``stochastic_sampling`` (re-noises every step), ``invert_sigmas`` (sigmas run 0 -> 1: the start
    from noise and the strength start assume 1 = noise) or another scheduler class.
    """
    name = type(scheduler).__name__
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise StreameditError(f"scheduler {name} is not supported: streamedit's denoising loop is "
                              "FlowMatchEulerDiscreteScheduler's Euler step")
    cfg = scheduler.config
    for key in ("stochastic_sampling", "invert_sigmas"):
        if cfg.get(key, False):
            raise StreameditError(f"scheduler config {key}=true is not supported: streamedit's Euler step "
                                  "(diffusion/denoiser.py) reproduces only the deterministic flow-matching step from sigma 1")


def default_strength(models: Models) -> float:
    """The start sigma a model folder's ``streamedit.json`` names (the demo model has one), else 1."""
    return float((models.extras or {}).get("strength", 1.0))


def working_size(size: int | None, source: str) -> int:
    """``size`` if given, else the model's native size (:func:`native_size`), else 512."""
    return size if size is not None else native_size(source) or 512


def native_size(source: str) -> int | None:
    """The working size a model folder's ``streamedit.json`` names (the demo model: 256), read without
    loading the model; None for hub ids, ``random:*`` and folders without one."""
    folder = DEMO_PATH if source == "demo" else Path(source).expanduser()
    meta = folder / "streamedit.json"
    try:
        size = json.loads(meta.read_text()).get("size") if meta.is_file() else None
    except (OSError, ValueError):
        return None
    return int(size) if isinstance(size, int) else None


def _load_processor(source: str):
    """The checkpoint's processor; folders saved without a video processor (streamedit's own, on any
    machine) load as the image-only one even where torchvision would allow the stock class."""
    try:
        return proc.processor_class().from_pretrained(source, subfolder="processor")
    except Exception:  # e.g. OSError: no video_preprocessor_config.json
        if proc.processor_class() is proc.ImageOnlyQwen3VLProcessor:
            raise
        return proc.ImageOnlyQwen3VLProcessor.from_pretrained(source, subfolder="processor")


def warn_unknown_instruction(models: Models, prompt: str) -> bool:
    """Warn (once per call) when a model that lists its instructions gets another one; True if warned."""
    known = models.extras.get("instructions") if models.extras else None
    if not known or prompt.strip().lower() in {k.lower() for k in known}:
        return False
    log.warning("this model was trained on these instructions only: %s (got %r)", ", ".join(known), prompt)
    return True


def _hub_snapshot(repo: str, revision: str | None) -> str:
    """Local folder of a hub model: the cache if it has it, else a download (fails fast offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _hub_reachable():
        raise StreameditError(f"model {repo!r} is not in the local Hugging Face cache and the hub cannot be "
                              "reached: download it on a connected machine, or pass a local folder")
    try:
        return snapshot_download(repo, revision=revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreameditError(f"could not download model {repo!r}: {first}") from exc


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A TCP connect to the hub endpoint, bounded in time (DNS included), so offline runs fail fast."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise StreameditError(f"model folder {str(path)!r} is not a directory")
    if not (path / "model_index.json").is_file():
        raise StreameditError(f"model folder {str(path)!r} has no model_index.json (not a diffusers pipeline folder)")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise StreameditError(f"model folder {str(path)!r} is missing component(s): {', '.join(missing)}")


def describe(source: str, revision: str | None = None) -> list[tuple[str, str, int]]:
    """(component, class, parameter count) rows; random builds are made on the meta device."""
    device = "meta" if source.startswith("random:") else "cpu"
    models = load_models(source, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                         revision=revision)
    rows = []
    for name in COMPONENTS:
        comp = getattr(models, name)
        n = sum(p.numel() for p in comp.parameters()) if isinstance(comp, torch.nn.Module) else 0
        rows.append((name, type(comp).__name__, n))
    return rows, models
