"""Static-shape, sync-free Qwen3-VL conditioning: :class:`TextEncoderRunner` for a fixed size and prompt.

With a fixed TE view (``te_size`` 512 or 256, text/exact.py TE_VIEWS) and prompt, every shape in the TE
is static: each frame gives the same token ids and a 1x32x32 (1x16x16) patch grid. Everything that
depends only on (size, prompt) and the weights is computed once, on the device, with the model's own code:

* per size: the uint8 -> pixel-value table (read off the image processor run on a probe image
  holding every byte value), the interpolated learned position embeddings and the vision rotary
  cos/sin (``vision_utils`` helpers + the modules, exactly as ``Qwen3VLVisionModel.forward`` does);
* per prompt: the token embeddings, the M-RoPE ids (``get_rope_index``) -> text rotary cos/sin,
  the image-token span, the causal mask for [prefix ; suffix] and the K/V of the 64-token system
  prefix (``edit_prefix_len``) from the library's text model with a ``DynamicCache``.

The per-batch forward (:meth:`FastTextEncoderRunner._forward`) then calls the model's submodules
(patch_embed, block norms/MLPs/qkv/proj, mergers, decoder layers, the final norm: the identity for
DreamLite's pre-norm features, ``Models.te_features``) with no ``.tolist()`` /
``.item()`` / ``nonzero`` and no data-dependent shape, so ``torch.compile(fullgraph=True)`` and
CUDA graphs apply (:func:`streamedit.accel.compile_te.compile_te` does both). The output equals
:class:`TextEncoderRunner`'s up to float reassociation (tests: <= 1e-4 in fp32). With ``te_size`` 256 the padded sequence's pad tokens are not computed: the real
tokens see only earlier ones (causal, right padding), and the output's pad rows are zeros, as the
exact runner's. Constants are snapshots: rebuild the runner if the TE weights change.

``fp8=True`` (an approximation, off by default; engine ``te_fp8``) runs the vision blocks' and
decoder layers' Linears as e4m3 matmuls (:mod:`streamedit.text.fp8`) on a parameter-sharing copy of
those modules; the shared model is not modified.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision, eager_attention_forward
from transformers.vision_utils import get_vision_interpolation_indices_and_weights, get_vision_position_ids

from ..accel.kernels import linear_gelu_tanh, shallow, with_prefix_causal
from ..errors import StreameditError
from .exact import TextEncoderRunner
from .fp8 import Fp8Linear, with_fp8_linears  # noqa: F401  (Fp8Linear: public name kept here)


class _PrefixKV:
    """Stand-in for a transformers ``Cache`` holding the prompt prefix's per-layer K/V.

    ``Qwen3VLTextAttention`` only calls ``past_key_values.update(k, v, layer_idx)`` and attends to
    what it returns. This returns ``[prefix ; new]`` (prefix broadcast over the batch) and stores
    nothing, so the forward stays functional (traceable, graph-capturable, re-entrant).
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        b = key_states.shape[0]
        k = torch.cat([self.keys[layer_idx].expand(b, -1, -1, -1), key_states], dim=2)
        v = torch.cat([self.values[layer_idx].expand(b, -1, -1, -1), value_states], dim=2)
        return k, v


def _hook_free(module: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter, with empty forward-hook tables.

    transformers installs output-capturing hooks on the decoder layers and vision blocks the first
    time anything asks for ``output_hidden_states`` (diffusers' pipeline does); they are useless
    here and split the compiled graph. Fresh tables also keep hooks added later off this copy.
    """
    new = shallow(module, **{n: _hook_free(m) for n, m in module._modules.items() if m is not None})
    for name in ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
                 "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
        if hasattr(module, name):
            setattr(new, name, type(getattr(module, name))())
    return new


class FastTextEncoderRunner(TextEncoderRunner):
    """Drop-in for :class:`TextEncoderRunner` (``prepare_images`` / ``text_inputs`` / ``encode``).

    ``prepare_images`` only stacks the frames (uint8 (B,H,W,3), pinned on CUDA); resizing,
    rescale/normalize and patchify run on the device inside ``encode``. Working sizes other than
    the TE view's are resized with ``F.interpolate(antialias=True)`` rounded to uint8: bicubic for
    512, which approximates (is not equal to) upstream's PIL LANCZOS, bilinear for 256, which
    approximates PIL BILINEAR; at the TE size it is the identity, exactly like PIL's resize to the
    same size.
    """

    def __init__(self, models, batch_size: int = 8, fp8: bool = False, fused_kernels: bool = True,
                 te_size: int | None = None, prompt_tokens: int | None = None):
        """``prompt_tokens``: compute every prompt's sequence at one length, room for that many prompt tokens
        (longer prompts are refused: :meth:`check_prompt`), so a prompt change only copies constants into
        place and never recompiles or re-captures (the multi-stream engine, where a stream's prompt change
        must not stall the others). The rows past a prompt's own tokens are zeros and masked
        (:meth:`text_mask`); the real rows are what the unpadded forward gives (causal: they never see
        the pad rows). None: each prompt at its own length, unmasked (a new length: a new graph)."""
        super().__init__(models, te_size)  # the feature model (its final norm: identity if prenorm), image_processor, size, text_inputs() and its cache
        self.batch_size = batch_size  # nominal; shapes come from each call (a new B: one more compile/graph)
        self.visual, self.lm = _hook_free(self.model.visual), _hook_free(self.model.language_model)
        if fp8:  # approximation: the vision blocks' and decoder layers' Linears in FP8 (mergers stay)
            self.visual = shallow(self.visual, blocks=with_fp8_linears(self.visual.blocks))
            self.lm = shallow(self.lm, layers=with_fp8_linears(self.lm.layers))
        # exact kernel substitutions (accel/kernels.py): flash's bottom-right causal attention over the cached
        # prefix, and the vision MLP's tanh-GELU as a GEMM epilogue; CUDA only, the library path elsewhere
        self.fused_kernels = fused_kernels
        if fused_kernels:
            self.lm = shallow(self.lm, layers=with_prefix_causal(self.lm.layers))
        self._gelu_epilogue = fused_kernels and self.visual.config.hidden_act == "gelu_pytorch_tanh"
        self.device = models.device
        self.te_dtype = next(self.model.parameters()).dtype
        ip = self.image_processor
        self.patch, self.merge, self.tps = ip.patch_size, ip.merge_size, ip.temporal_patch_size
        factor = self.patch * self.merge
        if smart_resize(self.size, self.size, factor, ip.size["shortest_edge"], ip.size["longest_edge"]) != (
                self.size, self.size):
            raise ValueError(f"the image processor would resize {self.size}x{self.size}: not supported")
        self.grid = (1, self.size // self.patch, self.size // self.patch)  # image_grid_thw of every frame
        self.n_patches = self.grid[1] * self.grid[2]
        self.n_tokens = self.n_patches // self.merge**2  # <|image_pad|> tokens per frame
        self.c: dict = {}  # device tensors read by _forward (updated in place when shapes allow)
        self._layout = 0  # bumped whenever a constant is re-allocated (CUDA graphs must be re-captured)
        self._prompt = None
        self.n_pad = 0  # zero rows appended to the output (te_size 256: the sequence padded to 256 tokens)
        self.prompt_tokens = prompt_tokens
        self._suffix_len: int | None = None  # prompt_tokens: the computed suffix rows, for every prompt
        self._masks: dict[str, torch.Tensor] = {}  # prompt_tokens: text_mask per prompt (a few recent ones)
        self._prompts: dict[str, tuple] = {}  # set_prompt's constants per prompt (a few recent ones)
        # what encode() runs; accel.compile_te.compile_te installs the compiled forward and its CUDA graph
        self.forward_fn = self._forward  # the static forward, or its torch.compile wrapper
        # compiled with a CUDA-graph mode: a graphs.StaticGraph of forward_fn per batch size, made by
        # new_graph. One graph per batch: a multi-stream engine's TE batch changes from tick to tick (1, 2, 4)
        # and a single graph re-captured at each change stalled its launches (issue 25, 2026-12-07).
        self.new_graph = None
        self.graphs: dict[int, object] = {}
        self._vision_constants()

    # ---- precomputation -----------------------------------------------------------------------
    def _store(self, name: str, value):
        """Keep a constant; same shape -> copy in place, so compiled code and CUDA graphs stay valid."""
        old = self.c.get(name)
        if isinstance(value, list):
            same = isinstance(old, list) and len(old) == len(value) and all(
                o.shape == v.shape and o.dtype == v.dtype for o, v in zip(old, value))
            if same:
                for o, v in zip(old, value):
                    o.copy_(v)
                return
        elif isinstance(old, torch.Tensor) and old.shape == value.shape and old.dtype == value.dtype:
            old.copy_(value)
            return
        self.c[name] = [v.clone() for v in value] if isinstance(value, list) else value.clone()  # own storage:
        self._layout += 1  # the next prompt's values are copied into it, and the caller may keep ``value``

    @torch.no_grad()
    def _vision_constants(self):
        v, dev = self.visual, self.device
        grid = torch.tensor([self.grid], device=dev)
        # Pixel values are an elementwise function of each uint8 value and channel (rescale, normalize;
        # float64 then float32 in the PIL backend, fused in the torchvision one). Read the table off
        # the processor itself on a probe holding all 256 values per channel: exact for either backend.
        self.lut_offsets = (torch.arange(3, device=dev) * 256).view(3, 1, 1)
        r, c = np.mgrid[:self.size, :self.size]  # every byte in every channel, varying along rows and columns
        probe = np.stack([(7 * r + 3 * c + 85 * k) % 256 for k in range(3)], -1).astype(np.uint8)
        ref = torch.as_tensor(self.image_processor(images=[probe], return_tensors="pt")["pixel_values"]).float()
        where = self._pixel_values(torch.from_numpy(probe)[None].to(dev), torch.arange(768.0, device=dev)).long()
        lut = torch.zeros(768, device=dev).index_put_((where.flatten(),), ref.flatten().to(dev))
        if not torch.equal(lut[where], ref.to(dev)):  # one value per (channel, byte) and our patch layout
            raise ValueError("the image processor is not an elementwise map of the pixels in the Qwen2-VL layout")
        self.lut32 = lut
        # the reference casts pixel_values to models.dtype (engine), then to the vision dtype
        self._store("lut", self.lut32.to(self.models.dtype).to(v.dtype))
        # Learned position embeddings resampled to the 32x32 grid: a function of the weights and the
        # grid only; the same helper + expression as Qwen3VLVisionModel.forward, once per image.
        idx, w = get_vision_interpolation_indices_and_weights(
            grid, v.num_grid_per_side, mode=v.interpolation_mode, align_corners=v.interpolation_align_corners,
            spatial_merge_size=v.config.spatial_merge_size)
        self._store("pos_embeds", (v.pos_embed(idx) * w[:, :, None]).sum(1).to(self.te_dtype))
        # 2-D rotary cos/sin of one image (N, head_dim) fp32; every image of the batch has the same grid,
        # so per-image broadcasting equals the reference's concatenation over images.
        cos, sin = v.rotary_pos_emb(self.c["pos_embeds"], get_vision_position_ids(grid, v.spatial_merge_size))
        self._store("vis_cos", cos)
        self._store("vis_sin", sin)
        impl = v.config._attn_implementation
        self._vision_attn_fn = ALL_ATTENTION_FUNCTIONS.get_interface(impl, eager_attention_forward)

    @torch.no_grad()
    def set_prompt(self, prompt: str) -> None:
        """Per-prompt constants (host syncs happen here, once per prompt, never per batch)."""
        if prompt == self._prompt:
            return
        values, self.span, self.n_pad = self._constants(prompt)
        for name, value in values.items():
            self._store(name, value)
        self._prompt = prompt

    def _constants(self, prompt: str) -> tuple[dict, tuple[int, int], int]:
        """:meth:`_prompt_constants`, computed once per prompt and kept for the last 16."""
        if prompt not in self._prompts:
            if len(self._prompts) >= 16:
                self._prompts.pop(next(iter(self._prompts)))
            self._prompts[prompt] = self._prompt_constants(prompt)
        return self._prompts[prompt]

    def _prompt_constants(self, prompt: str) -> tuple[dict, tuple[int, int], int]:
        """What :meth:`set_prompt` stores for ``prompt``: (constants by name, image span, zero rows after)."""
        values = {}
        text = self.text_inputs(prompt)
        real = int(text["attention_mask"][0].sum())  # right padding: the real tokens come first
        n_pad = text["input_ids"].shape[1] - real
        text = {k: v[:, :real] for k, v in text.items()}
        ids = text["input_ids"].to(self.device)
        grid = torch.tensor([self.grid], device=self.device)
        prefix = self.models.edit_prefix_len
        fixed = self.fixed_length(prompt) if self.prompt_tokens else None  # (suffix rows computed, own rows)
        # M-RoPE ids (3, 1, L): what Qwen3VLModel.forward computes through compute_3d_position_ids for
        # a batch of identical rows (all-ones mask). The 4-row variant (text row + 3) only feeds mask
        # construction/packed-sequence detection, which is replaced by the explicit mask below.
        pos, _ = self.model.get_rope_index(ids, text["mm_token_type_ids"].to(self.device), image_grid_thw=grid)
        image = (ids[0] == self.model.config.image_token_id).nonzero().flatten().tolist()
        start, end = image[0] - prefix, image[-1] + 1 - prefix  # span in the suffix
        if len(image) != self.n_tokens or image[-1] + 1 - image[0] != len(image) or start < 0:
            raise ValueError("expected one contiguous run of image tokens after the dropped prefix")
        embeds = self.lm.embed_tokens(ids)
        if fixed is not None:  # pad rows after the prompt's own: zero embeddings at the following positions
            extra = fixed[0] - fixed[1]
            embeds = F.pad(embeds, (0, 0, 0, extra))
            pos = torch.cat([pos, pos[:, :, -1:] + torch.arange(1, extra + 1, device=pos.device)], dim=2)
            n_pad = max(0, real + n_pad - prefix - fixed[0])  # what still follows as zeros (te_size 256's padding)
            keep = torch.zeros(1, fixed[0], 1, dtype=self.te_dtype, device=self.device)
            keep[:, :fixed[1]] = 1
            values["keep"] = keep
        # Prefix K/V: the first `prefix` tokens are text only (no image, no deepstack) and, with causal
        # attention, their hidden states and K/V never see later tokens; the library's text model on
        # them alone (positions 0..prefix-1 as in the full sequence) yields the K/V the full pass uses.
        cache = DynamicCache(config=self.lm.config)
        self.lm(inputs_embeds=embeds[:, :prefix], position_ids=pos[:, :, :prefix], past_key_values=cache,
                use_cache=True)
        values["keys"] = [layer.keys.clone() for layer in cache.layers]
        values["values"] = [layer.values.clone() for layer in cache.layers]
        # Rotary cos/sin are per position, so those of the suffix positions (sliced from the full
        # sequence's M-RoPE ids) are the full pass's cos/sin rows; (1, L-prefix, d), broadcast over B.
        cos, sin = self.lm.rotary_emb(embeds, pos[:, :, prefix:])
        values["cos"], values["sin"] = cos, sin
        values["text"] = embeds[:, prefix:].contiguous()  # image rows are overwritten per batch
        # Suffix query i sits at absolute position prefix+i and may see keys 0..prefix+i: the library's
        # mask builder for this attention implementation, with the query offset (no padding).
        cfg = self.lm.config
        values["mask"] = (ALL_MASK_ATTENTION_FUNCTIONS[cfg._attn_implementation](
            batch_size=1, q_length=embeds.shape[1] - prefix, kv_length=embeds.shape[1], q_offset=prefix, kv_offset=0,
            mask_function=causal_mask_function, attention_mask=None, allow_is_causal_skip=False,
            dtype=self.te_dtype, config=cfg, device=self.device))
        return values, (start, end), n_pad

    def fixed_length(self, prompt: str) -> tuple[int, int]:
        """With ``prompt_tokens``: (suffix rows every prompt is computed at, this prompt's own rows); a
        StreameditError when the prompt does not fit."""
        prefix = self.models.edit_prefix_len
        own = int(self.text_inputs(prompt)["attention_mask"][0].sum()) - prefix
        if self._suffix_len is None:  # the template's own rows (an empty prompt) + room for prompt_tokens
            inputs = self.text_inputs("")
            room = int(inputs["attention_mask"][0].sum()) - prefix + self.prompt_tokens
            self._suffix_len = min(-(-room // 8) * 8, inputs["input_ids"].shape[1] - prefix if self.pad_to else room)
        if own > self._suffix_len:
            raise StreameditError(f"the prompt is too long for this engine ({own - self._suffix_len} tokens over "
                                  f"its limit of about {self.prompt_tokens} tokens): shorten it")
        return self._suffix_len, own

    def check_prompt(self, prompt: str) -> None:
        """Raise StreameditError now (on the caller's thread) if ``prompt`` cannot be encoded."""
        if self.prompt_tokens:
            self.fixed_length(prompt)

    def text_mask(self, prompt: str) -> torch.Tensor | None:
        if not self.prompt_tokens:
            return super().text_mask(prompt)
        if prompt not in self._masks:
            rows, own = self.fixed_length(prompt)
            mask = torch.zeros(1, rows + self._padding_after(prompt, rows), dtype=torch.long, device=self.device)
            mask[:, :own] = 1
            if len(self._masks) >= 16:
                self._masks.pop(next(iter(self._masks)))
            self._masks[prompt] = mask
        return self._masks[prompt]

    def _padding_after(self, prompt: str, rows: int) -> int:
        """Zero rows after the computed ones (te_size 256: its sequence is padded to ``pad_to`` tokens)."""
        return max(0, self.text_inputs(prompt)["input_ids"].shape[1] - self.models.edit_prefix_len - rows) \
            if self.pad_to else 0

    def output_shape(self, prompt: str) -> tuple[int, int]:
        """(tokens after the dropped prefix, hidden size): what :meth:`encode` returns per frame."""
        self.set_prompt(prompt)
        return self.c["cos"].shape[1] + self.n_pad, self.lm.config.hidden_size

    # ---- per-batch, static ----------------------------------------------------------------------
    def prepare_images(self, frames: list[np.ndarray]) -> torch.Tensor:
        host = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        np.stack(frames, out=host.numpy())  # into pinned memory: one copy, not a stack then a pin
        return host

    def resize(self, frames: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 -> (B,3,S,S) uint8 (approximates the view's PIL resample; identity at the TE size)."""
        x = frames.permute(0, 3, 1, 2)
        if tuple(x.shape[-2:]) == (self.size, self.size):
            return x
        mode = "bilinear" if self.resample == Image.BILINEAR else "bicubic"
        x = F.interpolate(x.float(), size=(self.size, self.size), mode=mode, antialias=True, align_corners=False)
        return x.round().clamp(0, 255).to(torch.uint8)  # PIL resizes in 8 bit: keep a uint8 intermediate

    def _pixel_values(self, frames: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
        """Resize, rescale/normalize (table) and Qwen2-VL patchify: (B*1024, C*T*P*P)."""
        x = lut[self.resize(frames).long() + self.lut_offsets]  # (B, C, S, S)
        b, c, p, m, t = x.shape[0], x.shape[1], self.patch, self.merge, self.tps
        g = self.size // p // m
        # processor: (C, gh/m, m, P, gw/m, m, P) -> (gh/m, gw/m, m, m, C, P, P), T copies after C
        x = x.reshape(b, c, g, m, p, g, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)
        return x.reshape(b * self.n_patches, c * t * p * p)

    def patchify(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The processor's ``pixel_values`` (fp32) and ``image_grid_thw`` for uint8 (B,H,W,3) frames."""
        grid = torch.tensor([self.grid] * frames.shape[0])
        return self._pixel_values(frames.to(self.lut32.device), self.lut32), grid

    def _vision_attention(self, attn, x: torch.Tensor) -> torch.Tensor:
        """``Qwen3VLVisionAttention.forward`` for B equal-size images laid out as (B, N, D).

        The module takes packed (sum N, D) tokens and, outside flash attention, splits them per image
        with ``cu_seqlens.tolist()`` (a host sync and data-dependent shapes). Images never attend to
        each other, so one batched attention over (B, heads, N, d) is the same computation. This is
        that call, with the module's own weights, rotary function and attention interface.
        """
        b, n, _ = x.shape
        q, k, v = attn.qkv(x).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 1, 3, 4).unbind(0)
        q, k = apply_rotary_pos_emb_vision(q, k, self.c["vis_cos"], self.c["vis_sin"])  # (N, d) broadcasts over B
        out, _ = self._vision_attn_fn(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                      attention_mask=None, scaling=attn.scaling, dropout=0.0, is_causal=False)
        return attn.proj(out.reshape(b, n, -1))

    def _vision_mlp(self, mlp, x: torch.Tensor) -> torch.Tensor:
        """``Qwen3VLVisionMLP.forward``; fc1 + tanh-GELU as one GEMM where :func:`linear_gelu_tanh` applies."""
        if self._gelu_epilogue and type(mlp.linear_fc1) is nn.Linear:
            return mlp.linear_fc2(linear_gelu_tanh(x, mlp.linear_fc1))
        return mlp(x)

    def _forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 on the device -> (B, L - prefix, hidden). No host syncs, static shapes."""
        c, v, lm = self.c, self.visual, self.lm
        b = frames.shape[0]
        # vision tower: Qwen3VLVisionModel.forward with precomputed positions and batched attention
        # patch_embed's Conv3d has kernel == stride == one patch: the same sums as one matmul over the
        # flattened (C, T, P, P) patch, which runs on tensor cores (cuDNN's 3-D kernel measured 1.3 ms per
        # batch of 8 on an H100, scripts/gpu_main_profile.py --te)
        proj = v.patch_embed.proj
        pixels = self._pixel_values(frames, c["lut"]).to(proj.weight.dtype)
        h = F.linear(pixels, proj.weight.flatten(1), proj.bias).view(b, self.n_patches, -1)
        h = h + c["pos_embeds"]
        deepstack = []
        for i, blk in enumerate(v.blocks):  # Qwen3VLVisionBlock.forward
            h = h + self._vision_attention(blk.attn, blk.norm1(h))
            h = h + self._vision_mlp(blk.mlp, blk.norm2(h))
            if i in v.deepstack_visual_indexes:  # mergers take 2x2 blocks of consecutive tokens per image
                merger = v.deepstack_merger_list[v.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(h).view(b, self.n_tokens, -1))
        image = v.merger(h).view(b, self.n_tokens, -1)
        # text model on the suffix: image features replace the <|image_pad|> rows (masked_scatter on
        # a static span), prefix K/V come from the cache, deepstack adds at the same image rows.
        s, e = self.span
        text = _rows(c["text"], b)
        h = torch.cat([text[:, :s], image.to(text.dtype), text[:, e:]], dim=1)
        cache, rope = _PrefixKV(c["keys"], c["values"]), (c["cos"], c["sin"])
        for i, layer in enumerate(lm.layers):
            h = layer(h, position_embeddings=rope, attention_mask=c["mask"], past_key_values=cache)
            if i < len(deepstack):  # Qwen3VLTextModel._deepstack_process: h[image] += deepstack[i]
                h = torch.cat([h[:, :s], h[:, s:e] + deepstack[i].to(h.dtype), h[:, e:]], dim=1)
        h = lm.norm(h)  # nn.Identity for a "prenorm" model (DreamLite): nothing is computed
        if "keep" in c:  # prompt_tokens: the rows past the prompt's own are zeros
            h = h * _rows(c["keep"], b)
        if self.n_pad:  # the padded sequence's pad rows (masked in the U-Net)
            h = torch.cat([h, h.new_zeros(b, self.n_pad, h.shape[-1])], dim=1)
        return h  # the features the model was trained on (Models.te_features)

    @torch.no_grad()
    def encode(self, prompt: str, images: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch, tokens - prefix, hidden) prompt embeddings on the model's device/dtype."""
        self.set_prompt(prompt)
        return self._run(images, batch)

    def _run(self, images: torch.Tensor, batch: int) -> torch.Tensor:
        """The forward (or its graph) on the constants in place."""
        frames = images[:batch]
        if self.new_graph is not None:  # the key: everything the capture baked in besides the input shape
            graph = self.graphs.get(batch)
            if graph is None:
                graph = self.graphs[batch] = self.new_graph()
            out = graph(frames, key=(self._layout, self.span, self.n_pad))
            return out.to(self.models.dtype, copy=True)  # the next replay overwrites the graph's output
        return self.forward_fn(frames.to(self.device, non_blocking=True)).to(self.models.dtype)

    def release(self) -> None:
        """Drop the CUDA graphs (their pools go with them), then the per-size and per-prompt constants they
        read. The runner is done after this (the engine's close)."""
        super().release()
        for graph in self.graphs.values():
            graph.release()
        self.graphs.clear()
        self.c.clear()
        self._prompts.clear()
        self._masks.clear()
        self._prompt = None


def _rows(constant: torch.Tensor, b: int) -> torch.Tensor:
    """A per-prompt constant for ``b`` rows: one row broadcast, or the first ``b`` of per-row values
    (text/mixed.py keeps a prompt per row)."""
    return constant.expand(b, -1, -1) if constant.shape[0] == 1 else constant[:b]


@torch.no_grad()
def te_fp8_agreement(models, frames: torch.Tensor, prompt: str, te_size: int = 512) -> dict:
    """How close the FP8 TE's output is to the exact one on the same (B,H,W,3) uint8 frames (TE view ``te_size``).

    Both run the uncompiled fast forward (the compiled one computes the same ops). Cosine
    similarity per output token over the hidden dim (mean and min over tokens and frames), and
    the relative L2 error ``|fp8 - ref| / |ref|`` of the whole output.
    """

    b = frames.shape[0]
    runner = FastTextEncoderRunner(models, b, te_size=te_size)
    ref = runner.encode(prompt, frames, b).float()
    fp8 = FastTextEncoderRunner(models, b, fp8=True, te_size=te_size).encode(prompt, frames, b).float()
    mask = runner.text_mask(prompt)
    if mask is not None:  # te_size 256: the pad rows are zeros in both, not tokens
        keep = mask[0].bool()
        ref, fp8 = ref[:, keep], fp8[:, keep]
    cos = F.cosine_similarity(fp8, ref, dim=-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "rel_l2": float((fp8 - ref).norm() / ref.norm().clamp(min=1e-12)), "frames": b}
