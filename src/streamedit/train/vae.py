"""``train base``'s VAE pieces: the whole VAE trained from scratch (stage 2), and a new or grown decoder
(``--decoder-channels``/``--decoder-blocks``) on a kept encoder, so every latent the U-Net knows stays the same.

Growing is exact: ``AutoencoderTinyBlock`` is ``relu(conv(x) + x)``, and a stage's blocks after its first
see a ReLU output (>= 0), so a block appended there with its last conv zeroed returns its input unchanged.
The grown model decodes exactly as before and the tuning starts from there.
"""

from __future__ import annotations

import torch

from .common import autocast, image_loss, lr_at, step_and_log, to_pm1


def train_vae(vae, images: torch.Tensor, cfg, log_rows: list, bar=None) -> None:
    """``images``: (N,S,S,3) uint8 on the training device (sources and targets together)."""
    device = images.device
    gen = torch.Generator(device).manual_seed(cfg.seed)
    params = list(vae.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.vae_lr, weight_decay=1e-4)
    vae.train()
    for step in range(cfg.vae_steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr)
        x = to_pm1(images[torch.randint(len(images), (cfg.vae_batch,), device=device, generator=gen)])
        with autocast(device):
            z = vae.encode(x).latents
            rec = vae.decode(z).sample
        loss = image_loss(rec.float(), x) + 1e-3 * z.float().pow(2).mean()
        step_and_log(opt, params, loss, log_rows, bar, "vae", step, cfg.vae_steps)
    vae.eval().requires_grad_(False)


def _layer_keys(num_blocks) -> list[tuple]:
    """(stage, kind, index) of each entry of ``DecoderTiny.layers``, in order (its own construction)."""
    keys = [("in", "conv", 0), ("in", "act", 0)]
    for stage, n in enumerate(num_blocks):
        keys += [(stage, "block", k) for k in range(n)]
        if stage < len(num_blocks) - 1:
            keys.append((stage, "up", 0))
        keys.append((stage, "conv", 0))
    return keys


def _grow(old, new, old_blocks, new_blocks) -> None:
    """Copy ``old``'s decoder into ``new`` (same width, more blocks) and make the added blocks identities."""
    place = {key: i for i, key in enumerate(_layer_keys(new_blocks))}
    for key, layer in zip(_layer_keys(old_blocks), old.decoder.layers):
        new.decoder.layers[place[key]].load_state_dict(layer.state_dict())
    for stage, (was, now) in enumerate(zip(old_blocks, new_blocks)):
        for k in range(was, now):
            last = new.decoder.layers[place[(stage, "block", k)]].conv[-1]
            torch.nn.init.zeros_(last.weight)
            torch.nn.init.zeros_(last.bias)


def new_decoder(models, cfg):
    """With ``--decoder-channels``/``--decoder-blocks``: (the VAE with a new decoder of that shape, whether it
    needs fitting to the ``init_from`` model's U-Net) - grown from that model's decoder where that is exact (same
    width, only blocks added, each stage that gains blocks having one), else random; the encoder's weights and the
    scaling factor are kept. A fresh run (no ``init_from``) trains the whole VAE anyway: nothing to fit.
    Without either option: (None, False)."""
    from ..errors import StreameditError

    config = models.vae.config
    old_blocks = tuple(config.num_decoder_blocks)
    width = config.decoder_block_out_channels
    override = {}
    if cfg.decoder_channels:
        override["decoder_block_out_channels"] = (cfg.decoder_channels,) * len(width)
    if cfg.decoder_blocks:
        if len(cfg.decoder_blocks) != len(old_blocks):
            raise StreameditError(f"--decoder-blocks needs {len(old_blocks)} values (one per decoder stage), got "
                                  + ",".join(map(str, cfg.decoder_blocks)))
        override["num_decoder_blocks"] = tuple(cfg.decoder_blocks)
    if not override:
        return None, False
    if cfg.init_from and not cfg.decoder_steps:
        raise StreameditError("a new decoder (--decoder-channels/--decoder-blocks) needs --decoder-steps > 0 to train it")
    torch.manual_seed(cfg.seed + 4)
    vae = type(models.vae).from_config(config, **override).to(models.device, torch.float32)
    vae.encoder.load_state_dict(models.vae.encoder.state_dict())
    blocks = override.get("num_decoder_blocks", old_blocks)
    grows = (cfg.init_from and tuple(override.get("decoder_block_out_channels", width)) == tuple(width)
             and all(now >= was and (was or not now) for was, now in zip(old_blocks, blocks)))
    if grows:
        _grow(models.vae, vae, old_blocks, blocks)
    return vae.eval().requires_grad_(False), bool(cfg.init_from) and not grows
