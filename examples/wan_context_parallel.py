"""Sparse attention on one clip split over several GPUs by diffusers' context parallelism (Wan 2.1 T2V 1.3B).

Every process runs this script; `torchrun` starts them. Ulysses (the default) gives each GPU all tokens of
1/N of the heads; `--ring` gives each GPU 1/N of the tokens and passes the keys around:

    huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B-Diffusers
    torchrun --nproc_per_node 2 examples/wan_context_parallel.py --method window --out wan_cp
    torchrun --nproc_per_node 2 examples/wan_context_parallel.py --method window --ring --out wan_cp

`--pipeline demo` runs the demo model that ships with sparse-dit instead (no download, runs on CPU too), and
`--check` also generates the clip on each process alone and prints how far the split run is from it:

    torchrun --nproc_per_node 2 examples/wan_context_parallel.py --pipeline demo --check --frames 4 --size 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
import torch.distributed as dist

import sparse_dit  # noqa: F401  (adds enable_sparse_attention to every diffusers pipeline)

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
PROMPT = "A cat walks on the grass, realistic style."


def load(name: str, device: torch.device):
    """The pipeline and the arguments of one call to it."""
    if name == "demo":
        pipe = sparse_dit.load_demo_pipeline()
        return pipe.to(device), dict(prompt="a yellow circle moving down", output_type="pt")
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(name, subfolder="vae", torch_dtype=torch.float32, local_files_only=True)
    pipe = WanPipeline.from_pretrained(name, vae=vae, torch_dtype=torch.bfloat16, local_files_only=True).to(device)
    return pipe, dict(prompt=PROMPT, guidance_scale=5.0)


def split(transformer: torch.nn.Module, ring: bool, processes: int) -> None:
    """Split the transformer's attention over the processes: ring or Ulysses, over all of them."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(ring_degree=processes) if ring else ContextParallelConfig(ulysses_degree=processes)
    if torch.cuda.is_available():
        transformer.enable_parallelism(config=config)
    else:
        # diffusers 0.42.1 places each rank on an accelerator (rank % device_count()); a CPU has none, so count one.
        with mock.patch("torch.accelerator.device_count", return_value=1):
            transformer.enable_parallelism(config=config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=MODEL, help=f"a Wan pipeline in the local cache, or demo (default: {MODEL})")
    parser.add_argument("--method", default="window", help="a registered method (sparse-dit methods)")
    parser.add_argument("--options", default="{}", help='method options as JSON, e.g. \'{"window": [3, 9, 9]}\'')
    parser.add_argument("--ring", action="store_true", help="ring attention instead of Ulysses")
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 832), metavar=("HEIGHT", "WIDTH"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--check", action="store_true", help="compare with the clip generated on one process")
    parser.add_argument("--out", default=None, help="write OUT_<method>.mp4 (Wan pipelines)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, processes = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, torch.get_num_threads() // processes))
    options = {"min_seq_len": 0, **json.loads(args.options)}
    pipe, call = load(args.pipeline, device)
    pipe.set_progress_bar_config(disable=rank != 0)
    call.update(height=args.size[0], width=args.size[1], num_frames=args.frames, num_inference_steps=args.steps)

    def generate():
        # Every process draws the same noise: the clip is one, only its attention is split.
        return pipe(**call, generator=torch.Generator(device).manual_seed(0)).frames[0]

    alone = None
    if args.check:
        pipe.enable_sparse_attention(args.method, **options)
        alone = generate()
        pipe.disable_sparse_attention()
    split(pipe.transformer, args.ring, processes)
    pipe.enable_sparse_attention(args.method, **options)
    start = time.perf_counter()
    frames = generate()
    seconds = time.perf_counter() - start
    stats = pipe.sparse_attention_stats()
    if rank == 0:
        mode = "ring" if args.ring else "Ulysses"
        print(f"{args.method} under {mode} over {processes} processes: {seconds:.1f} s, density "
              f"{stats.density(sparse_only=True):.3f} on the sparse steps")
        heads = {len(e.head_densities) for e in stats.entries.values()}
        print(f"per-head densities of all {heads.pop()} heads in every process's stats")
        if alone is not None:
            difference = (torch.as_tensor(frames).float() - torch.as_tensor(alone).float()).abs().max().item()
            print(f"largest difference from one process: {difference:.2e}")
        if args.out is not None and args.pipeline != "demo":
            from diffusers.utils import export_to_video

            export_to_video(frames, f"{args.out}_{args.method}.mp4", fps=16)
    # Neither process may tear the group down while the other's gloo threads still serve it: once in the test
    # suite a process aborted at exit ("terminate called without an active exception") after a correct run.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
