"""A real hub pipeline, Wan 2.1 T2V 1.3B, dense and with sparse attention. Needs a CUDA GPU (about 20 GB) and
the weights in the local Hugging Face cache; sparse-dit itself never downloads anything.

    huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    python examples/wan_hub.py --method window --out wan
"""

from __future__ import annotations

import argparse
import time

import torch

import sparse_dit  # noqa: F401  (adds enable_sparse_attention to every diffusers pipeline)

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
PROMPT = "A cat walks on the grass, realistic style."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="window", help="a registered method (sparse-dit methods)")
    parser.add_argument("--options", default="{}", help='method options as JSON, e.g. \'{"window": [3, 9, 9]}\'')
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--out", default="wan")
    args = parser.parse_args()

    import json

    from diffusers import AutoencoderKLWan, WanPipeline
    from diffusers.utils import export_to_video

    if not torch.cuda.is_available():
        raise SystemExit("this example needs a CUDA GPU; on CPU try examples/one_line.py with the demo model")
    vae = AutoencoderKLWan.from_pretrained(MODEL, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    pipe = WanPipeline.from_pretrained(MODEL, vae=vae, torch_dtype=torch.bfloat16, local_files_only=True).to("cuda")
    call = dict(prompt=PROMPT, height=480, width=832, num_frames=args.frames, guidance_scale=5.0, num_inference_steps=50)

    for label in ("dense", args.method):
        if label != "dense":
            pipe.enable_sparse_attention(args.method, **json.loads(args.options))
        torch.cuda.synchronize()
        start = time.perf_counter()
        frames = pipe(**call, generator=torch.Generator("cuda").manual_seed(0)).frames[0]
        torch.cuda.synchronize()
        print(f"{label}: {time.perf_counter() - start:.1f} s")
        export_to_video(frames, f"{args.out}_{label}.mp4", fps=16)
    print(pipe.sparse_attention_stats())
    pipe.disable_sparse_attention()


if __name__ == "__main__":
    main()
