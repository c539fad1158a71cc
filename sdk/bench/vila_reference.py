"""An independent reference for VILA / NVILA (`LlavaLlamaModel`), which transformers does not
ship: transformers' building blocks (`AutoModelForCausalLM` for `llm/`, `SiglipVisionModel` for
`vision_tower/`, `SiglipImageProcessor`, the tokenizer) composed the way the public code
(NVlabs/VILA, the NVILA release: `llava_arch.py`, `mm_utils.py`, `encoders/`, `media.py`)
composes them, step by step as written there: PIL tiles, per-tile image processor, the tower's
`hidden_states[select_layer]`, dynamic-S2 chessboard merges with "area" resizes, the projector's
`view` / `permute` space-to-channel, the encoders' end-token embeddings, and the decoder run on
`inputs_embeds`, greedy by re-forwarding the whole sequence each step. It reads the checkpoint
in the hub's folder layout and shares no code with polymodal (it lives in the package because
`polymodal bench nvila-8b` measures it: `bench/vila.py`, on the GPU in bf16, batched as the
public `generate` batches).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers as tf
from PIL import Image
from safetensors.torch import load_file
from torch import nn

IMAGE, VIDEO = "<image>", "<vila/video>"
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def flat_square(x: torch.Tensor, k: int) -> torch.Tensor:
    """VILA's `flat_square` / `flat_square_3x3`: `[n, w, h, c]`, zero-padded, folded k x k."""
    n, w, h, c = x.size()
    if w % k:
        x = torch.cat([x, x.new_zeros(n, k - w % k, h, c)], dim=1)
        n, w, h, c = x.size()
    if h % k:
        x = torch.cat([x, x.new_zeros(n, w, k - h % k, c)], dim=2)
        n, w, h, c = x.size()
    x = x.contiguous().view(n, w, h // k, c * k)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, h // k, w // k, c * k * k)
    return x.permute(0, 2, 1, 3).contiguous()


class DownSample(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x):
        side = int(x.shape[1] ** 0.5)
        x = flat_square(x.reshape(x.shape[0], side, side, -1), self.k)
        return x.reshape(x.shape[0], -1, x.shape[-1])


def build_projector(kind: str, m: int, hidden: int) -> nn.Sequential:
    """VILA's `MultimodalProjector.layers` for the kinds the tiny checkpoints use."""
    if kind == "mlp_downsample":
        return nn.Sequential(
            DownSample(2),
            nn.LayerNorm(4 * m),
            nn.Linear(4 * m, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
    if kind == "mlp_downsample_3x3_fix":
        return nn.Sequential(
            DownSample(3),
            nn.LayerNorm(9 * m),
            nn.Linear(9 * m, 3 * m),
            nn.GELU(),
            nn.LayerNorm(3 * m),
            nn.Linear(3 * m, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
    raise ValueError(kind)


def merge_chessboard(x, nh, nw):
    """llava_arch's `merge_chessboard`: `[b * nh * nw, n, c]` or `[.., c, h, w]` tiles ->
    `[b, c, H, W]`."""
    if x.dim() == 3:
        side = int(x.shape[1] ** 0.5)
        x = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)
    b = x.shape[0] // (nh * nw)
    rows = [
        torch.cat([x[(i * nw + j) * b : (i * nw + j + 1) * b] for j in range(nw)], -1)
        for i in range(nh)
    ]
    return torch.cat(rows, dim=-2)


def split_chessboard(x, nh, nw):
    _, _, H, W = x.shape
    h, w = H // nh, W // nw
    return torch.cat(
        [x[:, :, i * h : (i + 1) * h, j * w : (j + 1) * w] for i in range(nh) for j in range(nw)]
    )


def closest_aspect_ratio(aspect, ratios, width, height, size):
    best_diff, best = float("inf"), (1, 1)
    for ratio in ratios:
        diff = abs(aspect - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and width * height > 0.5 * size * size * ratio[0] * ratio[1]:
            best = ratio
    return best


def crop_grid(image, ratio, size):
    w, h = size * ratio[0], size * ratio[1]
    resized = image.resize((w, h))
    cols = w // size
    boxes = [
        ((i % cols) * size, (i // cols) * size, (i % cols + 1) * size, (i // cols + 1) * size)
        for i in range(ratio[0] * ratio[1])
    ]
    return [resized.crop(b) for b in boxes]


def ratios(lo, hi):
    found = {
        (i, j)
        for n in range(lo, hi + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= hi and i * j >= lo
    }
    return sorted(found, key=lambda x: x[0] * x[1])


class VilaReference:
    """The public code's inference path (the tests: a tiny checkpoint, fp32 on the CPU)."""

    def __init__(self, path, models: bool = True, device="cpu", dtype=torch.float32):
        """`models=False`: the preprocessing only (no decoder, tower or projector loaded)."""
        root = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        self.cfg = json.loads((root / "config.json").read_text())
        self.images = tf.SiglipImageProcessor.from_pretrained(root / "vision_tower")
        self.size = self.images.size["height"]
        self.scales = [int(s) for s in (self.cfg.get("s2_scales") or "").split(",") if s]
        video = self.cfg.get("video_encoder") or {}
        video = json.loads(video) if isinstance(video, str) else video
        self.pools = video.get("pool_sizes") if "TSP" in video.get("_target_", "") else None
        if not models:
            return
        self.tok = tf.AutoTokenizer.from_pretrained(root / "llm")
        for token in (IMAGE, VIDEO):
            if token not in self.tok.get_vocab():
                self.tok.add_tokens([token], special_tokens=True)
        self.load_models(root)
        self.llm.to(self.device).eval()
        self.tower.to(self.device).eval()
        self.projector.to(self.device, dtype)

    def load_models(self, root: Path) -> None:
        """`llm`, `tower` and `projector` from the checkpoint's three folders."""
        self.llm = tf.AutoModelForCausalLM.from_pretrained(root / "llm", dtype=self.dtype)
        self.tower = tf.SiglipVisionModel.from_pretrained(root / "vision_tower", dtype=self.dtype)
        self.projector = self.new_projector(self.tower.config, self.llm.config)
        state = {
            k[len("layers.") :]: v
            for k, v in load_file(str(root / "mm_projector" / "model.safetensors")).items()
        }
        self.projector.load_state_dict(state, strict=True)

    def new_projector(self, tower_config, llm_config) -> nn.Sequential:
        kind = self.cfg["mm_projector_cfg"]["mm_projector_type"]
        mm_hidden = tower_config.hidden_size * (
            len(self.scales) if self.cfg.get("dynamic_s2") else 1
        )
        return build_projector(kind, mm_hidden, llm_config.hidden_size)

    # ---- prompt and media (generate_content, extract_media) ----
    def prompt_ids(self, value: str) -> list[int]:
        value = value.strip()
        if self.tok.chat_template is not None:
            text = self.tok.apply_chat_template(
                [{"role": "user", "content": value}], add_generation_prompt=True, tokenize=False
            )
        else:  # vicuna_v1 (SeparatorStyle.TWO)
            text = VICUNA_SYSTEM + " " + "USER: " + value + " " + "ASSISTANT:"
        return self.tok(text).input_ids

    def preprocess(self, image) -> torch.Tensor:
        return self.images(image, return_tensors="pt")["pixel_values"][0]

    def single(self, image) -> torch.Tensor:
        aspect = self.cfg["image_aspect_ratio"]
        if aspect == "resize":
            image = image.resize((self.size, self.size))
        elif aspect == "pad" and image.width != image.height:
            side = max(image.size)
            colour = tuple(int(x * 255) for x in self.images.image_mean)
            canvas = Image.new(image.mode, (side, side), colour)
            canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
            image = canvas
        # SigLIP's processor resized with PIL (bicubic) in the transformers the code ran with
        return self.preprocess(image.resize((self.size, self.size), Image.BICUBIC))

    def s2_views(self, image):
        size, scales, views = self.size, self.scales, []
        for scale in scales[:-1]:
            k = scale // scales[0]
            views += crop_grid(image, (k, k), size)
        lo = (scales[-1] // scales[0]) ** 2
        ratio = closest_aspect_ratio(
            image.width / image.height, ratios(lo, self.cfg["max_tiles"]), *image.size, size
        )
        views += crop_grid(image, ratio, size)
        return torch.stack([self.preprocess(v) for v in views]), (ratio[1], ratio[0])

    def dynamic_views(self, image):
        ratio = closest_aspect_ratio(
            image.width / image.height,
            ratios(self.cfg["min_tiles"], self.cfg["max_tiles"]),
            *image.size,
            self.size,
        )
        views = crop_grid(image, ratio, self.size)
        if len(views) != 1:
            views.append(image.resize((self.size, self.size)))
        return torch.stack([self.preprocess(v) for v in views])

    # ---- encoders (encode_images, BasicImageEncoder, TSPVideoEncoder) ----
    def encode_images(self, images, block_sizes=None):
        out = self.tower(images.to(self.device, self.dtype), output_hidden_states=True)
        feats = out.hidden_states[self.cfg["mm_vision_select_layer"]]  # cls_patch: all tokens
        if not self.cfg.get("dynamic_s2"):
            return list(self.projector(feats))
        block_sizes = block_sizes or [None] * len(images)
        per_image, blocks, cnt = [], [], 0
        for block in block_sizes:
            if block is None:
                f = feats[cnt : cnt + 1]
                side = int(f.shape[1] ** 0.5)
                f = f.transpose(1, 2).reshape(1, -1, side, side).repeat(1, len(self.scales), 1, 1)
                per_image.append(f)
                blocks.append((1, 1))
                cnt += 1
                continue
            maps = []
            for scale in self.scales[:-1]:
                k = scale // self.scales[0]
                maps.append(merge_chessboard(feats[cnt : cnt + k * k], k, k))
                cnt += k * k
            maps.append(merge_chessboard(feats[cnt : cnt + block[0] * block[1]], *block))
            cnt += block[0] * block[1]
            size = maps[self.cfg["s2_resize_output_to_scale_idx"]].shape[-2:]
            per_image.append(
                torch.cat(
                    [F.interpolate(m.float(), size=size, mode="area").to(m.dtype) for m in maps], 1
                )
            )
            blocks.append(block)
        assert cnt == len(feats)
        tiles = [split_chessboard(x, *b) for x, b in zip(per_image, blocks)]
        tiles = torch.cat([x.flatten(2).transpose(1, 2) for x in tiles])
        proj = self.projector(tiles).split([b[0] * b[1] for b in blocks])
        merged = [merge_chessboard(x, *b) for x, b in zip(proj, blocks)]
        return [x[0].flatten(1).transpose(0, 1) for x in merged]

    def embed_text(self, text):
        if not text:
            return None
        ids = torch.tensor(self.tok(text).input_ids, device=self.device)
        return self.llm.get_input_embeddings()(ids)

    def image_embeds(self, features):
        end = self.embed_text("\n")
        return [torch.cat([f, end]) for f in features]

    def video_embeds(self, features):  # [T, n, C] of one video
        end = self.embed_text("\n")
        if self.pools is None:  # BasicVideoEncoder: every frame, then its end tokens
            return torch.cat([features, end[None].expand(len(features), -1, -1)], 1).flatten(0, 1)
        out = []
        for pool in self.pools:
            t, n = features.shape[:2]
            side = int(n**0.5)
            x = features.view(t, side, side, -1)
            for dim, p in enumerate(pool):
                x = x.view(x.shape[:dim] + (-1, p) + x.shape[dim + 1 :]).mean(dim + 1)
            x = x.flatten(1, 2)
            out.append(torch.cat([x, end[None].expand(len(x), -1, -1)], 1).flatten(0, 1))
        return torch.cat(out)

    # ---- one request ----
    @torch.no_grad()
    def inputs_embeds(self, parts: list) -> torch.Tensor:
        """`parts`: PIL images, ("video", [frames]) and strings of one user turn, in order."""
        images = [p for p in parts if isinstance(p, Image.Image)]
        videos = [p[1] for p in parts if isinstance(p, tuple)]
        value = "".join(
            IMAGE if isinstance(p, Image.Image) else VIDEO if isinstance(p, tuple) else p
            for p in parts
        )
        aspect, embeds = self.cfg["image_aspect_ratio"], {"image": [], "video": []}
        if len(images) == 1 and aspect == "dynamic_s2":
            views, block = self.s2_views(images[0])
            embeds["image"] = self.image_embeds(self.encode_images(views, [block]))
        elif len(images) == 1 and aspect == "dynamic":
            views = self.dynamic_views(images[0])
            value = value.replace(IMAGE, f"{IMAGE}\n" * len(views))
            embeds["image"] = self.image_embeds(self.encode_images(views))
        elif images:
            embeds["image"] = self.image_embeds(
                self.encode_images(torch.stack([self.single(i) for i in images]))
            )
        for frames in videos:  # a frame folder: round(linspace) indices
            picks = np.round(np.linspace(0, len(frames) - 1, self.cfg["num_video_frames"])).astype(
                int
            )
            pixels = torch.stack([self.single(frames[i]) for i in picks])
            embeds["video"].append(self.video_embeds(torch.stack(self.encode_images(pixels))))
        return self.splice(self.prompt_ids(value), embeds)

    def splice(self, ids: list[int], embeds: dict) -> torch.Tensor:
        """The prompt's embeddings: each media token of `ids` replaced by the next of
        `embeds[kind]` (`[n, hidden]` each, consumed), the other tokens embedded."""
        media = {
            self.tok.convert_tokens_to_ids(IMAGE): "image",
            self.tok.convert_tokens_to_ids(VIDEO): "video",
        }
        table = self.llm.get_input_embeddings()
        pieces = []
        for token in ids:
            kind = media.get(token)
            if kind:
                pieces.append(embeds[kind].pop(0))
            else:
                pieces.append(table(torch.tensor([token], device=self.device)))
        assert not embeds["image"] and not embeds["video"], "media left unconsumed"
        return torch.cat(pieces)

    @torch.no_grad()
    def greedy(self, parts: list, steps: int):
        """Greedy tokens and the fp32 logits that chose each."""
        x = self.inputs_embeds(parts)[None]
        tokens, logits_seen = [], []
        for _ in range(steps):
            logits = self.llm(inputs_embeds=x).logits[0, -1].float()
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
            last = torch.tensor([[tokens[-1]]], device=self.device)
            x = torch.cat([x, self.llm.get_input_embeddings()(last)], 1)
        return tokens, logits_seen
