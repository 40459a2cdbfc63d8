"""``train base`` stages 4 and 5: the U-Net (flow matching at the runtime's operating point) and the
decoder tuned on the U-Net's own outputs.

At the demo size an eager U-Net step costs the host ~220 ms of Python and kernel launches: at batch 128
that, not the GPU, sets the pace (232 ms per step on an H100), while batch 512 is GPU-bound (456 ms).
On CUDA each instruction's whole step (forward, loss, backward, clipping, AdamW) is therefore captured
once into a CUDA graph and replayed (132 ms at batch 128), so small batches get 3.4x the optimizer
steps of batch 512 in the same minutes. It follows PyTorch's whole-network capture: the random draws fill static buffers outside the graph, gradients and optimizer state exist
before the capture, and the learning rate is a tensor. Instructions tokenize to different lengths, so
there is one graph per instruction; they share one memory pool (they replay one at a time, on one
stream, and keep nothing but their loss). With ``--joint-decoder`` the decoder's parameters join the same
optimizer and graph, trained by the pixel loss. Graphed and eager steps compute the same thing
(``scripts/gpu_train_check.py`` compares them on the GPU).
"""

from __future__ import annotations

import copy
import logging
import time

import torch
import torch.nn.functional as F

from .common import autocast, image_loss, lr_at, step_and_log, to_pm1

log = logging.getLogger(__name__)


class UNetStep:
    """One optimizer step of the U-Net on a random batch of one instruction (``style``)."""

    def __init__(self, models, data: dict, cfg, start: float, t_start: float):
        self.unet, self.vae, self.data, self.cfg = models.unet, models.vae, data, cfg
        device = self.device = models.device
        self.start, self.t_start = start, t_start
        self.scale = self.vae.config.scaling_factor  # model-space latents = VAE latents * scale
        bsz = cfg.unet_batch
        self.ones = int(bsz * cfg.one_step_fraction)  # share of the batch at the 1-step operating point
        self.npix = min(cfg.pixel_batch, self.ones)
        # static inputs: the draws of each step are written here (outside any graph)
        self.idx = torch.zeros(bsz, dtype=torch.long, device=device)
        self.noise = torch.zeros((bsz, *data["z_src"].shape[1:]), device=device)
        self.logits = torch.zeros(bsz, device=device)
        self.time_ids = torch.tensor([[cfg.size, cfg.size]], device=device, dtype=torch.float32).expand(bsz, -1)
        self.params = list(self.unet.parameters())
        if cfg.joint_decoder and cfg.pixel_weight:  # the decoder learns from the same pixel loss, in the same step
            self.vae.decoder.train().requires_grad_(True)
            self.params += list(self.vae.decoder.parameters())
        for p in self.params:
            p.grad = torch.zeros_like(p)  # static gradients: every graph writes into the same tensors
        cuda = device.type == "cuda"
        self.lr = torch.tensor(cfg.unet_lr, device=device) if cuda else None
        self.opt = torch.optim.AdamW(self.params, lr=self.lr if cuda else cfg.unet_lr, weight_decay=1e-2,
                                     **(dict(fused=True, capturable=True) if cuda else {}))
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.losses: dict[int, torch.Tensor] = {}
        self._pool = None

    def draw(self, gen: torch.Generator) -> None:
        torch.randint(len(self.data["z_src"]), self.idx.shape, generator=gen, device=self.device, out=self.idx)
        self.noise.normal_(generator=gen)
        self.logits.normal_(generator=gen)

    def set_lr(self, value: float) -> None:
        if self.lr is not None:
            self.lr.fill_(value)
        else:
            self.opt.param_groups[0]["lr"] = value

    def loss(self, style: int) -> torch.Tensor:
        from ..diffusion.denoiser import start_sample, vae_image

        d, idx, ones = self.data, self.idx, self.ones
        z0, zs, cond = d["z_tgt"][idx, style] * self.scale, d["z_src"][idx], d["emb"][style][idx]
        sigma = torch.sigmoid(self.logits) * self.start  # logit-normal below the start ...
        sigma[:ones] = self.start  # ... and the 1-step operating point
        timestep = sigma * 1000
        timestep[:ones] = self.t_start
        s = sigma.view(-1, 1, 1, 1)
        x = (1 - s) * z0 + s * self.noise
        x[:ones] = start_sample(self.noise[:ones], zs[:ones], self.start, self.scale)  # the runtime's first sample
        with autocast(self.device):
            pred = self.unet(torch.cat([x, zs], dim=3), timestep=timestep, encoder_hidden_states=cond,
                             added_cond_kwargs={"time_ids": self.time_ids}, return_dict=False)[0][..., :x.shape[-1]]
        pred = pred.float()
        loss = F.mse_loss(pred, (x - z0) / s)
        if self.cfg.pixel_weight:  # x0 of the operating-point samples through the frozen decoder
            x0 = (x - s * pred)[:self.npix]
            with autocast(self.device):
                img = vae_image(self.vae, x0, self.scale).float()
            loss = loss + self.cfg.pixel_weight * F.l1_loss(img, to_pm1(d["targets"][idx[:self.npix], style]))
        return loss

    def eager(self, style: int) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=False)  # in place: the gradients stay the static ones
        loss = self.loss(style)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        return loss.detach()

    def graphed(self, style: int) -> torch.Tensor:
        """The same step replayed from this style's CUDA graph (captured on first use)."""
        if style not in self.graphs:
            graph = torch.cuda.CUDAGraph()
            torch.cuda.synchronize(self.device)
            with torch.cuda.graph(graph, pool=self._pool):
                self.losses[style] = self.eager(style)  # recorded, not run
            self._pool = graph.pool() if self._pool is None else self._pool
            self.graphs[style] = graph
        self.graphs[style].replay()
        return self.losses[style]


def train_unet(models, data: dict, cfg, log_rows: list, bar=None, graph: bool | None = None):
    """Flow matching on precomputed latents/embeddings; returns the EMA U-Net.

    ``graph`` (default: on CUDA) replays each step from a CUDA graph after ``2 * styles`` eager warm-up
    steps on a side stream; a capture that fails falls back to eager steps with a warning.
    """
    from ..diffusion.denoiser import sigma_schedule

    device = models.device
    graph = device.type == "cuda" if graph is None else graph
    n_styles = data["z_tgt"].shape[1]
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    ema = copy.deepcopy(models.unet).requires_grad_(False)
    models.unet.train().requires_grad_(True)
    start, t_start = (float(v[0]) for v in sigma_schedule(models, cfg.size, [cfg.strength]))
    step_fn = UNetStep(models, data, cfg, start, t_start)
    # the U-Net's only: a jointly trained decoder is kept as trained (its LR ends at 0)
    ema_params, unet_params = list(ema.parameters()), list(models.unet.parameters())
    warmup = 2 * n_styles if graph else 0
    side = torch.cuda.Stream(device) if warmup else None
    total, step, t0 = cfg.unet_steps, 0, time.perf_counter()
    while step < total:
        if cfg.unet_minutes and step in (50, 100) and device.type == "cuda":
            torch.cuda.synchronize(device)  # the host runs steps ahead of the GPU: time what the GPU did
        if step == 50:
            t50 = time.perf_counter()
        if cfg.unet_minutes and step == 100:  # fit the budget (rate from steps 50-100: warm)
            per_step = (time.perf_counter() - t50) / 50
            left = cfg.unet_minutes * 60 - (time.perf_counter() - t0)
            total = max(101, min(total, 100 + int(left / per_step)))
            if bar is not None:
                bar.total = bar.n + total - step
        step_fn.set_lr(lr_at(step, total, cfg.unet_lr))
        step_fn.draw(gen)
        style = step % n_styles  # one instruction per batch: their embeddings differ in length
        if step < warmup:  # eager warm-up on a side stream (lazy initialisation happens outside the capture)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                loss = step_fn.eager(style)
            torch.cuda.current_stream(device).wait_stream(side)
        elif graph:
            try:
                loss = step_fn.graphed(style)
            except RuntimeError as exc:  # not capturable here: train on, eagerly
                log.warning("CUDA-graph capture of the U-Net step failed (%s); continuing eagerly", exc)
                graph = False
                loss = step_fn.eager(style)
        else:
            loss = step_fn.eager(style)
        with torch.no_grad():
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, unet_params, 1 - decay)
        if step % 100 == 0 or step == total - 1:  # .item() syncs: only now and then
            log_rows.append({"phase": "unet", "step": step, "loss": loss.item(), "graphed": bool(graph),
                             "s": round(time.perf_counter() - t0, 2)})
            if bar is not None:
                bar.set_postfix(phase="unet", loss=f"{log_rows[-1]['loss']:.4f}", refresh=False)
        if bar is not None:
            bar.update(1)
        step += 1
    models.unet.eval().requires_grad_(False)
    models.vae.eval().requires_grad_(False)
    for p in step_fn.params:
        p.grad = None
    return ema.eval()


@torch.no_grad()
def one_step(models, noise: torch.Tensor, z_src: torch.Tensor, emb: torch.Tensor, size: int, strength: float):
    """Model-space x0 of the runtime's 1-step output (start sample, velocity, one Euler step to 0),
    computed as training computes it (bf16 autocast on CUDA)."""
    from ..diffusion.denoiser import sigma_schedule, start_sample

    device = z_src.device
    start, t_start = (float(v[0]) for v in sigma_schedule(models, size, [strength]))
    x = start_sample(noise, z_src, start, models.vae.config.scaling_factor)
    time_ids = torch.tensor([[size, size]], device=device, dtype=torch.float32).expand(len(x), -1)
    with autocast(device):
        v = models.unet(torch.cat([x, z_src], dim=3), timestep=torch.full((len(x),), t_start, device=device),
                        encoder_hidden_states=emb, added_cond_kwargs={"time_ids": time_ids},
                        return_dict=False)[0][..., :x.shape[-1]]
    return x - start * v.float()


def one_step_latents(models, data: dict, cfg, chunk: int = 256) -> torch.Tensor:
    """(N, styles, C, h, w): :func:`one_step` for every crop and instruction, one fresh noise draw each."""
    z_src, device = data["z_src"], models.device
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)
    out = torch.empty(data["z_tgt"].shape, device=device)
    for style, emb in enumerate(data["emb"]):
        for i in range(0, len(z_src), chunk):
            zs = z_src[i:i + chunk]
            noise = torch.randn(zs.shape, device=device, generator=gen)
            out[i:i + chunk, style] = one_step(models, noise, zs, emb[i:i + chunk], cfg.size, cfg.strength)
    return out


def tune_decoder(models, data: dict, cfg, log_rows: list, bar=None) -> None:
    """Fine-tune the VAE decoder to map the U-Net's 1-step latents to the filtered targets.

    The runtime decodes nothing else; those latents carry the start noise the U-Net did not remove and
    its small errors, which a decoder trained only on clean latents turns into a mottled texture.
    The encoder (and so every latent the U-Net was trained on) is unchanged.
    """
    from ..diffusion.denoiser import vae_image

    device, vae = models.device, models.vae
    latents = one_step_latents(models, data, cfg)
    targets = data["targets"]
    n, n_styles = latents.shape[:2]
    scale = vae.config.scaling_factor
    decoder = vae.decoder.train().requires_grad_(True)
    params = list(decoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=1e-4)
    gen = torch.Generator(device).manual_seed(cfg.seed + 3)
    for step in range(cfg.decoder_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.decoder_steps, cfg.decoder_lr)
        idx = torch.randint(n, (cfg.vae_batch,), device=device, generator=gen)
        style = step % n_styles
        with autocast(device):
            img = vae_image(vae, latents[idx, style], scale).float()
        loss = image_loss(img, to_pm1(targets[idx, style]))
        step_and_log(opt, params, loss, log_rows, bar, "decoder", step, cfg.decoder_steps)
    vae.eval().requires_grad_(False)
