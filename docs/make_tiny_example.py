"""Inputs for the README's ``cascade-clip predict`` example, made offline: a drawn scene and a tiny random model.

Writes into ``--out``: ``scene.png`` (a 256x192 drawing: sky, sun, house, tree, grass, road), ``tiny_clip.pt``
(random ``cascade-tiny`` CLIP weights) and ``tiny.pt`` (a Cascade-CLIP checkpoint of this project, VOC preset, on that
CLIP, untrained). The model is random, so the masks ``predict`` draws from it are noise: the example shows the command
and its outputs, not segmentation quality. Real weights give real masks (see the README).
"""

import argparse
import os

import torch
from PIL import Image, ImageDraw

from cascade_clip import CascadeCLIP, ModelConfig
from cascade_clip.checkpoint import save_model_checkpoint
from cascade_clip.clip_arch import create_clip


def draw_scene(width: int = 256, height: int = 192) -> Image.Image:
    image = Image.new("RGB", (width, height), (135, 190, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse([200, 14, 236, 50], fill=(250, 220, 90))  # sun
    draw.rectangle([0, 120, width, height], fill=(90, 160, 70))  # grass
    draw.polygon([(110, height), (150, height), (132, 120), (124, 120)], fill=(120, 120, 125))  # road
    draw.rectangle([30, 80, 100, 130], fill=(200, 170, 140))  # house
    draw.polygon([(24, 82), (65, 50), (106, 82)], fill=(170, 60, 50))  # roof
    draw.rectangle([58, 105, 72, 130], fill=(110, 70, 40))  # door
    draw.rectangle([182, 95, 192, 135], fill=(100, 70, 40))  # trunk
    draw.ellipse([162, 60, 212, 105], fill=(40, 120, 50))  # crown
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    clip_path = os.path.join(args.out, "tiny_clip.pt")
    torch.save(create_clip("cascade-tiny").state_dict(), clip_path)
    cfg = ModelConfig.preset("voc", clip_model="cascade-tiny", clip_pretrained=clip_path, img_size=64, crop_size=64,
                             stride=48, num_prompt_tokens=4, decoder_heads=4, decoder_ffn_dim=256)
    save_model_checkpoint(os.path.join(args.out, "tiny.pt"), CascadeCLIP(cfg))
    draw_scene().save(os.path.join(args.out, "scene.png"))
    print(f"wrote scene.png, tiny_clip.pt, tiny.pt to {args.out}")


if __name__ == "__main__":
    main()
