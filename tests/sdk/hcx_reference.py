"""An independent reference for HyperCLOVA X SEED Vision (`HCXVisionForCausalLM`), which
transformers does not ship: transformers' `SiglipVisionModel` and `LlamaForCausalLM`, timm's
`RegStage`, and transformers' numpy image transforms composed the way the published code
composes them (the hub's `HCXVisionImageProcessor.preprocess` and `modeling_hyperclovax.py`,
as read in their TensorRT-LLM / vLLM / transformers-port copies): `resize_longside` +
`expand2square` for the global view, `select_best_resolution` + `_get_local_grids_output_size`
+ `pad` + `divide_to_grids` for the tiles, `resize` / `center_crop` / `rescale` / `normalize`
per grid; the tower's `hidden_states[use_nth_layer]`; the C-Abstractor's `pos_emb`, `net` and
`readout`; `anyres_postprocessing` (`reshape_and_unpad_image_features`, `unpad_image`,
`image_newline`); each image token of the tokenized prompt replaced by the image's embeddings
and the decoder run on `inputs_embeds`, greedy by re-forwarding the whole sequence each step.
It reads the checkpoint files and shares no code with polymodal.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file
from timm.layers import LayerNorm, LayerNorm2d
from timm.models.regnet import RegStage
from torch import nn
from transformers.image_transforms import (
    center_crop,
    get_resize_output_image_size,
    normalize,
    rescale,
    resize,
    to_channel_dimension_format,
)
from transformers.image_utils import ChannelDimension, PILImageResampling

LAST = ChannelDimension.LAST


def select_best_resolution(original_size, possible_resolutions):
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


def fill(shape, colour, dtype):
    out = np.empty(shape, dtype=dtype)
    for i in range(shape[2]):
        out[..., i].fill(colour[i])
    return out


def expand2square(image, colour):
    height, width = image.shape[:2]
    if width == height:
        return image
    side = max(width, height)
    out = fill((side, side, image.shape[2]), colour, image.dtype)
    if width > height:
        out[(width - height) // 2 : (width - height) // 2 + height, :] = image
    else:
        out[:, (height - width) // 2 : (height - width) // 2 + width] = image
    return out


def pad(image, target, colour):
    target_h, target_w = target
    height, width = image.shape[:2]
    out = fill((target_h, target_w, image.shape[2]), colour, image.dtype)
    x, y = (target_w - width) // 2, (target_h - height) // 2
    out[y : y + height, x : x + width, :] = image
    return out


def resize_longside(image, size, resample):
    height, width = image.shape[:2]
    if width == height:
        target = (size, size)
    elif width > height:
        target = (math.ceil(height / width * size), size)
    else:
        target = (size, math.ceil(width / height * size))
    return resize(image, size=target, resample=resample, input_data_format=LAST)


def local_grids_size(image, target):
    height, width = image.shape[:2]
    target_h, target_w = target
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        return min(math.ceil(height * scale_w), target_h), target_w
    return target_h, min(math.ceil(width * scale_h), target_w)


def unpad_image(tensor, original_size):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    if original_width / original_height > current_width / current_height:
        new_height = int(original_height * (current_width / original_width))
        padding = (current_height - new_height) // 2
        return tensor[:, padding : current_height - padding, :]
    new_width = int(original_width * (current_height / original_height))
    padding = (current_width - new_width) // 2
    return tensor[:, :, padding : current_width - padding]


class CAbstractor(nn.Module):
    """The published `HCXVisionCAbstractor` (Honeybee), built from timm's `RegStage`."""

    def __init__(self, num_queries, num_input_tokens, encoder_hidden, hidden, output_hidden,
                 pos_emb, prenorm):  # fmt: skip
        super().__init__()
        self.pos_emb = (
            nn.Parameter(torch.zeros(1, num_input_tokens, encoder_hidden)) if pos_emb else None
        )
        self.prenorm = LayerNorm(encoder_hidden) if prenorm else None
        block = partial(RegStage, stride=1, dilation=1, act_layer=nn.SiLU, norm_layer=LayerNorm2d)
        hw = int(num_queries**0.5)
        self.net = nn.Sequential(
            block(3, encoder_hidden, hidden),
            nn.AdaptiveAvgPool2d((hw, hw)),
            block(3, hidden, hidden),
        )
        self.readout = nn.Sequential(
            nn.Linear(hidden, output_hidden), nn.SiLU(), nn.Linear(output_hidden, output_hidden)
        )

    def forward(self, x):
        if self.prenorm is not None:
            x = self.prenorm(x)
        if self.pos_emb is not None:
            x = x + self.pos_emb
        b, length, dim = x.shape
        hw = int(length**0.5)
        x = x.reshape(b, hw, hw, dim).permute(0, 3, 1, 2)  # b (h w) d -> b d h w
        x = self.net(x)
        x = x.permute(0, 2, 3, 1).reshape(b, -1, x.shape[1])  # b d h w -> b (h w) d
        return self.readout(x)


class HCXReference:
    """Processor + model of a HyperCLOVA X SEED Vision checkpoint, as the published code."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        self.cfg = json.loads((path / "config.json").read_text())
        self.pre = json.loads((path / "preprocessor_config.json").read_text())
        self.tok = tf.AutoTokenizer.from_pretrained(path)
        state = load_file(str(path / "model.safetensors"))

        def part(prefix):
            return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}

        text = dict(self.cfg["language_config"])
        text.pop("model_type")
        self.llm = tf.LlamaForCausalLM(tf.LlamaConfig(**text)).eval()
        self.llm.load_state_dict(part("language_model."))
        vision = dict(self.cfg["vision_config"])
        vision.pop("model_type")
        self.vision_cfg = tf.SiglipVisionConfig(**vision)
        self.tower = tf.SiglipVisionModel(self.vision_cfg).eval()
        self.tower.load_state_dict(part("vision_model.vision_model."))
        vc = self.vision_cfg
        self.projector = CAbstractor(
            self.cfg["num_queries_vis_abstractor_image"],
            (vc.image_size // vc.patch_size) ** 2,
            vc.hidden_size,
            vc.hidden_size,
            text["hidden_size"],
            self.cfg["proj_pos_emb"],
            self.cfg["proj_prenorm"],
        ).eval()
        self.projector.load_state_dict(part("mm_projector."))
        self.image_newline = state["image_newline"]
        self.image_token_id = self.cfg["image_token_id"]
        grid = self.pre["crop_size"]["height"]
        if self.pre.get("possible_resolutions"):
            self.resolutions = self.pre["possible_resolutions"]
        else:  # the model's `_init_possible_resolutions`
            n = self.cfg["max_num_grids"]
            pairs = [(i, j) for i in range(1, n + 1) for j in range(1, n + 1) if i * j <= n]
            pairs = [p for p in pairs if p != (1, 1) or self.cfg.get("use_1x1_grid")]
            self.resolutions = [[i * grid, j * grid] for i, j in pairs]

    # ---- the image processor's `preprocess` ----
    def preprocess(self, image: Image.Image):
        pre, resample = self.pre, PILImageResampling(self.pre.get("resample", 3))
        size, grid = pre["size"]["shortest_edge"], pre["crop_size"]["height"]
        colour = tuple(int(x * 255) for x in pre["image_mean"])
        array = np.array(image.convert("RGB"))
        image_size = array.shape[:2]  # (h, w)
        if pre.get("pad_to_square", True):
            global_view = expand2square(resize_longside(array, size, resample), colour)
        else:
            global_view = resize(array, (size, size), resample=resample, input_data_format=LAST)
        grids = []
        if self.cfg["anyres"]:
            best = select_best_resolution(image_size, self.resolutions)
            fitted = resize(array, local_grids_size(array, best), resample=resample,
                            input_data_format=LAST)  # fmt: skip
            padded = pad(fitted, best, colour)
            tiles = [
                padded[i : i + grid, j : j + grid]
                for i in range(0, best[0], grid)
                for j in range(0, best[1], grid)
            ]
            grids = [global_view] + tiles
        elif pre.get("pad_to_square", True):
            grids = [global_view]
        else:  # the image as it is: resized and cropped below
            grids = [array]
        out = []
        for g in grids:
            target = get_resize_output_image_size(g, size=size, default_to_square=False,
                                                  input_data_format=LAST)  # fmt: skip
            g = resize(g, target, resample=resample, input_data_format=LAST)
            g = center_crop(g, (grid, grid), input_data_format=LAST)
            g = rescale(g, pre.get("rescale_factor", 1 / 255), input_data_format=LAST)
            g = normalize(g, pre["image_mean"], pre["image_std"], input_data_format=LAST)
            out.append(to_channel_dimension_format(g, ChannelDimension.FIRST, LAST))
        return torch.tensor(np.array(out)), (image_size[1], image_size[0])  # sizes as (w, h)

    # ---- the model's `forward_images` + `anyres_postprocessing` ----
    @torch.no_grad()
    def image_embeds(self, image: Image.Image) -> torch.Tensor:
        pixels, image_size = self.preprocess(image)
        states = self.tower(pixels, output_hidden_states=True).hidden_states
        feats = self.projector(states[self.cfg["use_nth_layer"]])  # [grids, q, hidden]
        if feats.shape[0] == 1:
            return feats[0]
        q = int(self.cfg["num_queries_vis_abstractor_image"] ** 0.5)
        grid = self.pre["crop_size"]["height"]
        base, tiles = feats[0], feats[1:]
        width, height = image_size
        best_h, best_w = select_best_resolution((height, width), self.resolutions)
        rows, cols = best_h // grid, best_w // grid
        tiles = tiles.view(rows, cols, q, q, -1)
        if self.cfg["unpad"]:
            x = tiles.permute(4, 0, 2, 1, 3).contiguous().flatten(1, 2).flatten(2, 3)
            x = unpad_image(x, image_size)
            newline = self.image_newline[:, None, None].expand(*x.shape[:-1], 1)
            x = torch.cat((x, newline), dim=-1).flatten(1, 2).transpose(0, 1)
        else:
            x = tiles.permute(0, 2, 1, 3, 4).contiguous().flatten(0, 3)
        return torch.cat((base, x), dim=0)

    # ---- one request ----
    @torch.no_grad()
    def inputs_embeds(self, images: list, text: str) -> torch.Tensor:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": text}]
        ids = self.tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True
        )
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        embeds = [self.image_embeds(im) for im in images]
        table = self.llm.get_input_embeddings()
        pieces = []
        for token in ids:
            if token == self.image_token_id:
                pieces.append(embeds.pop(0))
            else:
                pieces.append(table(torch.tensor([token])))
        assert not embeds, "images left unconsumed"
        return torch.cat(pieces)

    @torch.no_grad()
    def greedy(self, images: list, text: str, steps: int):
        """Greedy tokens and the fp32 logits that chose each."""
        x = self.inputs_embeds(images, text)[None]
        tokens, logits_seen = [], []
        for _ in range(steps):
            logits = self.llm(inputs_embeds=x).logits[0, -1].float()
            logits_seen.append(logits)
            tokens.append(int(logits.argmax()))
            x = torch.cat([x, self.llm.get_input_embeddings()(torch.tensor([[tokens[-1]]]))], 1)
        return tokens, logits_seen
