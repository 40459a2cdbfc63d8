"""ControlNet-LLLite adapter for ``DreamLiteUNetModel``, with a compile-friendly inference path.

Structure (identical to kohya-ss ``networks/control_net_lllite.py`` and its DreamLite port
``otanl/dreamlite-lllite``, so their weights load unchanged): one :class:`LLLiteModule` per hooked
Linear (``attn1.to_q/k/v`` and ``attn2.to_q`` of every transformer block, see
:func:`streamedit.models.hook_sites`), holding

* ``conditioning1``: strided convs, kernel == stride, no padding, ReLU between them, channels
  ``3 -> cond_emb_dim//2 (-> cond_emb_dim//2) -> cond_emb_dim``. The total stride is the pixel to
  token-grid ratio of the hooked block: ``vae_scale * 2**level`` (8/16/32 for DreamLite's three
  resolutions), factored greedily into 4s then a 2 (8 = 4*2, 16 = 4*4, 32 = 4*4*2: kohya's depths 1-3).
* ``down`` = Linear(C, mlp_dim) + ReLU, ``mid`` = Linear(cond_emb_dim + mlp_dim, mlp_dim) + ReLU
  (input is ``cat([cond, down(x)])``, cond first), optional dropout (training only),
  ``up`` = Linear(mlp_dim, C), zero-initialised (weight and bias).

The host Linear computes ``host(x + multiplier * up(...))``. DreamLite's edit input is
``cat([noisy, source], dim=W)``: the embedding (B, c, h, w) is zero-padded to (h, 2w) over the source
half and flattened row-major to (B, h*2w, c) tokens, matching the block's token order.

Two forwards, chosen by ``apply_lllite(..., inference_mode=)``:

* training (``inference_mode=False``): ``set_cond_image`` runs the conditioning CNNs with autograd and
  keeps the graph-connected embeddings; ordinary autograd through everything.
* inference (default): the embedding and the multiplier live in **non-persistent buffers of fixed
  shape** that ``set_cond_image`` / ``set_multiplier`` overwrite **in place** (``copy_``/``fill_``).
  The patched forward has no Python branch on data, only on shapes, so a
  ``torch.compile(unet, fullgraph=True)`` sees the same tensors (same identity, shape, dtype) after
  every update: zero graph breaks, zero recompiles. Buffers are sized for a batch ``B`` and a cond
  image ``H x W`` on the first ``set_cond_image`` or by ``allocate(B, H, W)``; call one of them before
  compiling. A smaller later batch is tiled cyclically into the ``B`` rows; a U-Net batch that is a
  multiple of ``B`` (CFG) repeats the rows, a smaller one uses the first rows. Changing ``H x W`` or
  growing ``B`` re-allocates (a compiled U-Net then recompiles once; a warning says so).

The patch replaces the host Linear's ``forward`` by an instance attribute
(``functools.partial(_forward_*, lllite_module, previous_forward)``): the U-Net's module tree and
``state_dict`` stay untouched, and ``remove_lllite`` deletes the attribute, restoring the original
forward exactly.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StreameditError
from .checkpoint import load_adapter, save_adapter
from .cond import CondEmbedder, patch_layout
from .hooks import hook_level, select_hooks

log = logging.getLogger(__name__)

# How the runtime builds the cond image (temporal/conditioner.py): "backward" = flow current -> previous, previous output
# sampled at x + F (ours); "forward" = flow previous -> current, sampled at x - F (the paper's released adapter)
FLOW_CONVENTIONS = ("backward", "forward")
_RESTORE = "_lllite_restore"  # host attribute: the instance forward it had before patching (or None)


@dataclass(frozen=True)
class LLLiteConfig:
    """Everything needed to rebuild an adapter; stored in the checkpoint metadata."""

    cond_emb_dim: int = 32
    mlp_dim: int = 64
    cond_size: int = 512  # default cond image side in pixels (the generated image's size)
    vae_scale: int = 8  # pixels per latent cell: stride of the finest level
    dropout: float | None = None
    hooks: tuple[str, ...] = ()
    flow: str = "backward"  # the flow convention it was trained with (FLOW_CONVENTIONS)

    def as_dict(self) -> dict:
        return asdict(self)


def conv_strides(total: int) -> list[int]:
    """Factor a total stride into 4s then one 2 (the public layer layout)."""
    strides = []
    while total > 1:
        step = 4 if total % 4 == 0 else 2
        if total % step:
            raise StreameditError(f"LLLite conditioning stride {total} is not a power of two")
        strides.append(step)
        total //= step
    return strides or [1]


class LLLiteModule(nn.Module):
    """The adapter of one hooked Linear (see the module docstring for the layout)."""

    def __init__(self, hook: str, in_dim: int, stride: int, cond_emb_dim: int, mlp_dim: int,
                 dropout: float | None = None):
        super().__init__()
        self.hook, self.stride, self.dropout = hook, stride, dropout
        layers: list[nn.Module] = []
        strides = conv_strides(stride)
        ch = 3
        for i, s in enumerate(strides):
            last = i == len(strides) - 1
            out = cond_emb_dim if last else cond_emb_dim // 2
            layers.append(nn.Conv2d(ch, out, kernel_size=s if s > 1 else 3, stride=s, padding=0 if s > 1 else 1))
            if not last:
                layers.append(nn.ReLU())
            ch = out
        self.conditioning1 = nn.Sequential(*layers)
        self.down = nn.Sequential(nn.Linear(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(nn.Linear(mlp_dim, in_dim))
        nn.init.zeros_(self.up[0].weight)
        nn.init.zeros_(self.up[0].bias)
        # Inference state: fixed-shape buffers written in place (never part of the state dict).
        self.register_buffer("cond_emb", torch.zeros(0), persistent=False)
        self.register_buffer("multiplier", torch.ones(()), persistent=False)
        self.live_cond: torch.Tensor | None = None  # training: graph-connected embedding

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> (B, H/s * 2W/s, cond_emb_dim) tokens, source half zero."""
        cx = self.conditioning1(images)
        cx = torch.cat([cx, torch.zeros_like(cx)], dim=3)
        return cx.flatten(2).transpose(1, 2)

    def delta(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """What is added to the host's input. Branches only on shapes (static under compile)."""
        if cond.dim() != 3:
            raise StreameditError(f"LLLite hook {self.hook}: no cond embedding; call adapter.set_cond_image() "
                                  "(or adapter.allocate()) before running the U-Net")
        n, b = x.shape[0], cond.shape[0]
        if n < b:
            cond = cond[:n]
        elif n != b:
            if n % b:
                raise StreameditError(f"LLLite hook {self.hook}: U-Net batch {n} is not a multiple of the "
                                      f"cond batch {b}")
            cond = cond.repeat(n // b, 1, 1)
        if cond.shape[1] != x.shape[1]:
            raise StreameditError(f"LLLite hook {self.hook}: the block has {x.shape[1]} tokens but the cond "
                                  f"embedding has {cond.shape[1]}; the cond image must be the generated image's "
                                  "size (latent size x vae_scale)")
        h = self.down(x)
        h = self.mid(torch.cat([cond.to(h.dtype), h], dim=-1))
        if self.dropout:
            h = F.dropout(h, p=self.dropout, training=self.training)
        return self.up(h) * self.multiplier


def _forward_inference(module: LLLiteModule, previous, x: torch.Tensor) -> torch.Tensor:
    return previous(x + module.delta(x, module.cond_emb))


def _forward_training(module: LLLiteModule, previous, x: torch.Tensor) -> torch.Tensor:
    if module.live_cond is None:
        raise StreameditError(f"LLLite hook {module.hook}: call adapter.set_cond_image() before the U-Net")
    return previous(x + module.delta(x, module.live_cond))


class LLLiteAdapter(nn.Module):
    """All LLLite modules for one U-Net and hook subset.

    Engine-facing API: ``set_cond_image(images)``, ``set_cond_rows(images, rows)``, ``set_multiplier(x)``,
    ``hooks``, ``config``,
    ``allocate(batch, height, width)``, ``save(path)`` / ``LLLiteAdapter.load(path, unet, hooks)``.
    ``inference_mode`` is set by :func:`apply_lllite` and decides what ``set_cond_image`` writes.
    """

    def __init__(self, config: LLLiteConfig, specs: dict[str, tuple[int, int]]):
        super().__init__()
        self.config = config
        self.inference_mode = True
        self._alloc: tuple[int, int, int] | None = None  # (batch, height, width) of the buffers
        self._buffers_by_stride: dict[int, torch.Tensor] = {}  # see allocate()
        self._groups: dict[int, list[LLLiteModule]] = {}  # see _by_stride()
        self._embedder = None  # lllite_cond.CondEmbedder once used (False: a layout it cannot batch)
        self.lllite = nn.ModuleDict({
            _key(hook): LLLiteModule(hook, in_dim, stride, config.cond_emb_dim, config.mlp_dim, config.dropout)
            for hook, (in_dim, stride) in specs.items()})

    @classmethod
    def for_unet(cls, unet: nn.Module, hooks: str | list[str] = "down", cond_emb_dim: int = 32, mlp_dim: int = 64,
                 cond_size: int = 512, vae_scale: int = 8, dropout: float | None = None,
                 flow: str = "backward") -> "LLLiteAdapter":
        """A fresh (zero ``up``) adapter on the U-Net's device and dtype; ``flow``: its flow convention."""
        if flow not in FLOW_CONVENTIONS:
            raise StreameditError(f"LLLite flow convention must be one of {', '.join(FLOW_CONVENTIONS)}, got {flow!r}")
        names = select_hooks(unet, hooks)
        specs = {n: (unet.get_submodule(n).in_features, vae_scale * 2 ** hook_level(unet, n)) for n in names}
        worst = max((s for _, s in specs.values()), default=1)
        if cond_size % worst:
            raise StreameditError(f"LLLite cond_size {cond_size} must be a multiple of {worst} "
                                  "(the coarsest hooked block's stride)")
        config = LLLiteConfig(cond_emb_dim, mlp_dim, cond_size, vae_scale, dropout, tuple(names), flow)
        param = next(unet.parameters())
        with torch.device(param.device):
            adapter = cls(config, specs)
        return adapter.to(param.dtype)

    @property
    def hooks(self) -> list[str]:
        return list(self.config.hooks)

    def module_for(self, hook: str) -> LLLiteModule:
        return self.lllite[_key(hook)]

    def items(self):
        return ((m.hook, m) for m in self.lllite.values())

    @property
    def rows(self) -> int:
        """Batch rows of the inference buffers (0 before they are allocated)."""
        return self._alloc[0] if self._alloc else 0

    def allocate(self, batch: int, height: int | None = None, width: int | None = None) -> None:
        """(Re)create the inference buffers for ``batch`` cond images of ``height x width`` pixels.

        The hooks of one stride share one buffer (batch, h, 2w, hooks, cond_emb_dim): each module's
        ``cond_emb`` is its (batch, h*2w, cond_emb_dim) view, so a refresh writes the whole group at once.
        """
        height = height or self.config.cond_size
        width = width or height
        param = next(self.parameters())
        for stride, mods in self._by_stride().items():
            if height % stride or width % stride:
                raise StreameditError(f"LLLite cond image {height}x{width} is not a multiple of {stride} "
                                      f"(stride of hook {mods[0].hook})")
            shape = (batch, height // stride, 2 * width // stride, len(mods), self.config.cond_emb_dim)
            self._share(torch.zeros(shape, device=param.device, dtype=param.dtype), mods)
        self._alloc = (batch, height, width)

    def buffer_set(self) -> tuple[dict, tuple[int, int, int] | None]:
        """The current inference buffers (what :meth:`allocate` made), to switch back to later with
        :meth:`use_buffer_set`: an engine serving several working sizes keeps one set per size, so a
        graph captured for a size keeps reading the buffers it was captured with."""
        return dict(self._buffers_by_stride), self._alloc

    def use_buffer_set(self, state: tuple[dict, tuple[int, int, int] | None]) -> None:
        buffers, alloc = state
        for stride, mods in self._by_stride().items():
            self._share(buffers[stride], mods)
        self._alloc = alloc

    def release_buffers(self) -> None:
        """Drop the inference buffers and the packed conditioning weights (``allocate`` makes new ones)."""
        self._buffers_by_stride = {}
        for _, m in self.items():
            m.cond_emb = torch.zeros(0, device=m.multiplier.device, dtype=m.multiplier.dtype)
        self._alloc = None
        self._embedder = None

    def _by_stride(self) -> dict[int, list[LLLiteModule]]:
        """The hooks grouped by conditioning stride, in hook order (fixed once the adapter is built)."""
        if not self._groups:
            for _, m in self.items():
                self._groups.setdefault(m.stride, []).append(m)
        return self._groups

    def _share(self, buffer: torch.Tensor, mods: list[LLLiteModule]) -> None:
        self._buffers_by_stride[mods[0].stride] = buffer
        for i, m in enumerate(mods):
            m.cond_emb = buffer[:, :, :, i].flatten(1, 2)

    def _apply(self, fn, recurse=True):
        # .to()/.half() move every module's view on its own: gather them into one buffer per stride again
        out = super()._apply(fn, recurse)
        if self._alloc is not None:
            b, h, w = self._alloc
            for stride, mods in self._by_stride().items():
                shape = (b, h // stride, 2 * w // stride, self.config.cond_emb_dim)
                self._share(torch.stack([m.cond_emb.reshape(shape) for m in mods], dim=3), mods)
        return out

    def set_cond_image(self, images: torch.Tensor) -> None:
        """Embed cond images: (B,3,H,W) uint8 in [0,255] or float in [-1,1], on the adapter's device.

        Inference mode: no grad, results ``copy_``'d into the fixed buffers (allocated on first use).
        Training mode: graph-connected embeddings kept for the next U-Net forwards.
        """
        images = self._as_input(images)
        param = next(self.parameters())
        if not self.inference_mode:
            for _, m in self.items():
                m.live_cond = m.embed(images)
            return
        b, _, h, w = images.shape
        if self._alloc is None or self._alloc[1:] != (h, w) or b > self._alloc[0]:
            if self._alloc is not None:
                log.warning("LLLite: re-allocating cond buffers for %dx%dx%d (a compiled U-Net recompiles once)",
                            max(b, self._alloc[0]), h, w)
            self.allocate(max(b, self._alloc[0] if self._alloc else 0), h, w)
        rows = torch.arange(self._alloc[0], device=param.device) % b
        with torch.no_grad():
            for stride, emb in self.embed(images).items():
                self._left_half(stride).copy_(emb if b == self._alloc[0] else emb[rows])

    def embed(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Inference: every hook's cond embedding of (B,3,H,W) images in [-1,1], as {stride: (B, h, w,
        hooks, cond_emb_dim)} (the hooks in ``_by_stride`` order), without the zero source half."""
        if self._embedder is None:
            groups = self._by_stride()
            self._embedder = CondEmbedder(groups) if patch_layout(groups) else False
        if self._embedder:
            return self._embedder(images)
        return {stride: torch.stack([m.conditioning1(images).permute(0, 2, 3, 1) for m in mods], dim=3)
                for stride, mods in self._by_stride().items()}

    def sync_cond_weights(self) -> None:
        """Repack the batched conditioning weights if they changed (before replaying a captured refresh)."""
        if self._embedder:
            self._embedder.sync()

    def _left_half(self, stride: int) -> torch.Tensor:
        """The generated half of a stride's buffer (the source half stays zero)."""
        buffer = self._buffers_by_stride[stride]
        return buffer[:, :, : buffer.shape[2] // 2]

    def _as_input(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise StreameditError(f"LLLite cond image must be (B,3,H,W), got {tuple(images.shape)}")
        param = next(self.parameters())
        if images.dtype == torch.uint8:
            images = images.to(param.device, torch.float32) / 127.5 - 1.0
        return images.to(param.device, param.dtype)

    def set_cond_rows(self, images: torch.Tensor, rows: torch.Tensor) -> None:
        """Inference: embed ``images`` (n,3,H,W) into buffer rows ``rows`` ((n,) long, on the device), in
        place, leaving the other rows as they are (the staggered refresh; capturable in a CUDA graph)."""
        self.write_rows(self.row_embeddings(images), rows)

    def row_embeddings(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """Inference: the cond embeddings of ``images`` (n,3,H,W) as :meth:`write_rows` takes them, for a
        caller that writes them again later (a multi-stream engine's stream that changes row keeps its own,
        so a move is a copy, not the cond CNN again)."""
        if self._alloc is None or tuple(images.shape[2:]) != self._alloc[1:]:
            raise StreameditError("LLLite: cond rows need buffers of the image size (allocate() first)")
        with torch.no_grad():
            return self.embed(self._as_input(images))

    def write_rows(self, embeddings: dict[int, torch.Tensor], rows: torch.Tensor) -> None:
        """Write :meth:`row_embeddings` (n rows) into buffer rows ``rows`` ((n,) long, on the device)."""
        with torch.no_grad():
            for stride, emb in embeddings.items():
                self._left_half(stride).index_copy_(0, rows, emb)

    def set_multiplier(self, value: float | torch.Tensor) -> None:
        """Strength of the adapter (0 = off), written in place into every module's buffer."""
        with torch.no_grad():
            for _, m in self.items():
                if isinstance(value, torch.Tensor):
                    m.multiplier.copy_(value)
                else:
                    m.multiplier.fill_(float(value))

    def save(self, path: str | Path) -> None:
        save_adapter(self, path)

    @classmethod
    def load(cls, path: str | Path, unet: nn.Module, hooks: str | list[str] | None = None,
             cond_size: int | None = None) -> "LLLiteAdapter":
        """Load a streamedit, dreamlite-lllite (``LLLiteController``) or kohya-style file (auto-detected).

        ``hooks=None`` loads every hook the file has weights for; a subset skips the others (one
        warning). ``cond_size`` is only needed for files without streamedit metadata (default 512).
        """
        return load_adapter(cls, path, unet, hooks, cond_size)


def _key(hook: str) -> str:
    return hook.replace(".", "__")


def apply_lllite(unet: nn.Module, adapter: LLLiteAdapter, inference_mode: bool = True) -> LLLiteAdapter:
    """Patch the hooked Linears of ``unet`` in place (apply before ``torch.compile``)."""
    targets = []
    for hook, m in adapter.items():
        try:
            host = unet.get_submodule(hook)
        except AttributeError:
            raise StreameditError(f"LLLite hook {hook!r} does not exist in this U-Net") from None
        if not isinstance(host, nn.Linear) or host.in_features != m.down[0].in_features:
            raise StreameditError(f"LLLite hook {hook!r} does not match this U-Net (expected a Linear with "
                                  f"{m.down[0].in_features} inputs, found {host})")
        if _RESTORE in vars(host):
            raise StreameditError(f"LLLite is already applied to {hook!r}; call remove_lllite(unet) first")
        targets.append((host, m))
    adapter.inference_mode = inference_mode
    step = _forward_inference if inference_mode else _forward_training
    for host, m in targets:
        own = vars(host).get("forward")  # an instance-level forward someone else installed, if any
        setattr(host, _RESTORE, own)
        host.forward = functools.partial(step, m, host.forward)
    return adapter


def remove_lllite(unet: nn.Module) -> int:
    """Undo :func:`apply_lllite` on every patched Linear; returns how many were restored."""
    count = 0
    for host in unet.modules():
        if _RESTORE in vars(host):
            own = vars(host).pop(_RESTORE)
            if own is None:
                del host.forward
            else:
                host.forward = own
            count += 1
    return count
