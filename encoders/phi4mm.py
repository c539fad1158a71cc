"""Phi-4-multimodal's media encoders (transformers' `Phi4MultimodalFeatureEmbedding`):
`image_embed` (SigLIP tower + dynamic-HD transform + 2-layer GELU projector) and `audio_embed`
(the conformer, `phi4mm_audio.py`, + one of two 2-layer GELU projectors: `speech` for prompts
with audio only, `vision_speech` for prompts that also hold an image, as the reference picks).

Vision: every crop (the global view first) runs through the tower to `feature_layer` (-2: the
last layer is skipped, no post-LayerNorm); padded patches are masked as keys and get the
reference's bucketized position ids. 2x2 average pooling gives `g x g` tokens a crop; the
global view's rows each end with the learned `sub_img_feature_extensor`, the sub-crops are
stitched into one grid (cropped to its valid rows / columns, each row ending with the same
separator); output = [sub grid, `global_img_feature_extensor`, global view].

Names below the root are transformers' (`image_embed.img_processor.*`, ...).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polymodal.encoders.phi4mm_audio import ConformerEncoder
from polymodal.encoders.siglip import SiglipEmbeddings
from polymodal.encoders.vision_layers import make_uninitialized
from polymodal.encoders.vit import ViTEncoder, uniform_segments
from polymodal.llm_core.attention import TorchAttentionBackend


class KeyMaskedAttention:
    """An attention backend for crops of equal length whose padded patches are masked as keys
    (every patch still queries). `varlen_attention`'s segments are the crops."""

    def __init__(self, key_mask: torch.Tensor) -> None:
        self.key_mask = key_mask  # bool [crops, patches]

    def varlen_attention(self, q, k, v, cu_seqlens, max_seqlen, scale, causal=False):
        crops, patches = self.key_mask.shape
        # [crops * patches, heads, d] -> [crops, heads, patches, d]
        q, k, v = (t.view(crops, patches, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        mask = self.key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        return out.transpose(1, 2).reshape(crops * patches, out.shape[1], out.shape[3])


def patch_position_ids(mask: torch.Tensor, side: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference's position ids `[crops, m * m]` of crops with patch masks `[crops, m, m]`:
    the valid rectangle's fractional coordinates bucketized onto the `side x side` table;
    masked patches take id 0."""
    device = mask.device
    boundaries = torch.arange(1 / side, 1.0, 1 / side, device=device)
    rows, cols = mask[:, :, 0].sum(1), mask[:, 0, :].sum(1)  # valid patches down / across
    h = torch.arange(mask.shape[1], device=device, dtype=torch.float32)
    w = torch.arange(mask.shape[2], device=device, dtype=torch.float32)
    frac_h = (h[None, :] * (1.0 / rows)[:, None]).clamp(max=1.0 - 1e-6).to(dtype)
    frac_w = (w[None, :] * (1.0 / cols)[:, None]).clamp(max=1.0 - 1e-6).to(dtype)
    bucket_h = torch.bucketize(frac_h, boundaries, right=True)
    bucket_w = torch.bucketize(frac_w, boundaries, right=True)
    ids = (bucket_h[:, :, None] * side + bucket_w[:, None, :]).flatten(1)
    return torch.where(mask.flatten(1), ids, 0)


class Phi4MMVisionTower(nn.Module):
    """SigLIP (transformers' names: `embeddings`, `encoder.layers.N`, `post_layernorm`) run to
    a feature layer over crops with patch masks."""

    def __init__(self, cfg, backend) -> None:
        super().__init__()
        self.backend = backend
        self.side = cfg.image_size // cfg.patch_size
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = ViTEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: torch.Tensor, mask: torch.Tensor, layer: int) -> torch.Tensor:
        """pixels `[crops, 3, S, S]`, mask bool `[crops, m, m]` -> `[crops, m * m, dim]`."""
        emb = self.embeddings
        weight = emb.patch_embedding.weight
        x = F.conv2d(pixels.to(weight.dtype), weight, emb.patch_embedding.bias,
                     stride=emb.patch_size)  # fmt: skip
        x = x.flatten(2).transpose(1, 2)  # [crops, m * m, dim]
        x = x + emb.position_embedding(patch_position_ids(mask, self.side, pixels.dtype))
        crops, patches, dim = x.shape
        full = bool(mask.all())
        backend = self.backend if full else KeyMaskedAttention(mask.flatten(1))
        meta = uniform_segments(crops, patches, x.device)
        depth = len(self.encoder.layers)
        # row-major (the sum kept the conv output's channel-major layout: see SiglipEmbeddings)
        x = self.encoder(x.reshape(-1, dim).contiguous(), meta, backend, layer % (depth + 1))
        return x.view(crops, patches, dim)


class Phi4MMImageEmbed(nn.Module):
    """HF `Phi4MultimodalImageEmbedding`: an image's crops -> its `[num_tokens, hidden]`."""

    def __init__(self, hf_config, backend) -> None:
        super().__init__()
        vc = hf_config.vision_config
        self.feature_layer, self.crop_size = vc.feature_layer, vc.crop_size
        self.img_processor = Phi4MMVisionTower(vc, backend)
        dim, hidden = vc.hidden_size, hf_config.hidden_size
        self.pad_odd = (vc.image_size // vc.patch_size) % 2 == 1
        self.img_projection_up = nn.Linear(dim, hidden)
        self.img_projection_down = nn.Linear(hidden, hidden)
        self.global_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, dim))
        self.sub_img_feature_extensor = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def pooled(self, pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`[crops, g * g, dim]`: the feature layer's patch grid, 2x2 average-pooled."""
        feats = self.img_processor(pixels, mask, self.feature_layer)
        crops, patches, dim = feats.shape
        side = int(patches**0.5)
        grid = feats.view(crops, side, side, dim).permute(0, 3, 1, 2)  # NCHW
        if self.pad_odd:
            grid = F.pad(grid, (0, 1, 0, 1), mode="reflect")
        grid = F.avg_pool2d(grid, 2, 2).permute(0, 2, 3, 1)  # [crops, g, g, dim]
        return grid.reshape(crops, -1, dim)

    def hd_transform(self, feats, mask, image_size) -> torch.Tensor:
        """One image's pooled crops `[1 + crops, g * g, dim]` -> its token rows, pre-projector."""
        g, dim = int(feats.shape[1] ** 0.5), feats.shape[-1]
        rows, cols = (int(v) // self.crop_size for v in image_size.tolist())
        glob = feats[0].view(1, g, g, dim)
        glob = torch.cat([glob, self.sub_img_feature_extensor.expand(1, g, 1, dim)], dim=2)
        sub = feats[1 : 1 + rows * cols].view(rows, cols, g, g, dim).transpose(1, 2)
        sub = sub.reshape(1, rows * g, cols * g, dim)
        valid = mask[1 : 1 + rows * cols, 0::2, 0::2].reshape(rows, cols, g, g)
        valid = valid.transpose(1, 2).reshape(rows * g, cols * g)
        height, width = int(valid[:, 0].sum()), int(valid[0, :].sum())
        sub = sub[:, :height, :width]
        sub = torch.cat([sub, self.sub_img_feature_extensor.expand(1, height, 1, dim)], dim=2)
        parts = [sub.reshape(1, -1, dim), self.global_img_feature_extensor, glob.view(1, -1, dim)]
        return torch.cat(parts, dim=1)[0]

    def forward(self, items: list) -> list[torch.Tensor]:
        pixels = torch.cat([it.data["pixel_values"] for it in items])
        device = pixels.device
        masks = [it.data["patch_mask"].to(device) for it in items]
        feats = self.pooled(pixels, torch.cat(masks))
        counts = [it.data["pixel_values"].shape[0] for it in items]
        out = []
        for item, f, m in zip(items, feats.split(counts), masks):
            rows = self.hd_transform(f, m, item.data["image_size"])
            rows = rows.to(self.img_projection_up.weight.dtype)
            out.append(self.img_projection_down(F.gelu(self.img_projection_up(rows))))
        return out


class Phi4MMAudioEmbed(nn.Module):
    """HF `Phi4MultimodalAudioEmbedding`: a clip's features -> `[ceil(T / 8), hidden]`."""

    def __init__(self, hf_config) -> None:
        super().__init__()
        ac = hf_config.audio_config
        self.encoder = ConformerEncoder(ac)
        dim, hidden = ac.hidden_size * ac.downsample_rate, hf_config.hidden_size
        self.up_proj_for_speech = nn.Linear(dim, hidden)
        self.down_proj_for_speech = nn.Linear(hidden, hidden)
        self.up_proj_for_vision_speech = nn.Linear(dim, hidden)
        self.down_proj_for_vision_speech = nn.Linear(hidden, hidden)

    def forward(self, items: list) -> list[torch.Tensor]:
        out = []
        weight = self.up_proj_for_speech.weight
        for item in items:  # one clip at a time: the reference's result for a clip alone
            states = self.encoder(item.data["audio_features"].to(weight.device, weight.dtype))
            if item.data.get("vision_speech", False):
                up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
            else:
                up, down = self.up_proj_for_speech, self.down_proj_for_speech
            out.append(down(F.gelu(up(states)))[: item.num_embeds])
        return out


class Phi4MMEncoder(nn.Module):
    """Images and audio clips of Phi-4-multimodal prompts -> one embedding tensor each."""

    def __init__(self, hf_config, backend=None) -> None:
        super().__init__()
        backend = backend if backend is not None else TorchAttentionBackend()
        self.image_embed = Phi4MMImageEmbed(hf_config, backend)
        self.audio_embed = Phi4MMAudioEmbed(hf_config)

    @classmethod
    def from_config(cls, hf_config, dtype=torch.float32, device="cpu", backend=None):
        """Build from the checkpoint's `Phi4MultimodalConfig`; the model's loader fills it."""
        return make_uninitialized(lambda: cls(hf_config, backend), dtype, device)

    def load_weights(self, named_tensors) -> None:
        from polymodal.encoders.vision_layers import load_checked

        load_checked(self, named_tensors)

    def encode(self, items: list) -> list[torch.Tensor]:
        """One `[item.num_embeds, hidden]` per item, in order (images batched in one tower
        call; clips one at a time)."""
        out: list[torch.Tensor | None] = [None] * len(items)
        for kind, embed in (("image", self.image_embed), ("audio", self.audio_embed)):
            picked = [i for i, it in enumerate(items) if it.modality == kind]
            if picked:
                for i, emb in zip(picked, embed([items[i] for i in picked])):
                    out[i] = emb
        return out
