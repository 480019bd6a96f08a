"""A diffusers WanPipeline (Wan 2.1) with FlexCache in front of it: a miss, then hits, resumed at step K.

    make serve                                                  # in one terminal: the daemon on 127.0.0.1:50051
    .venv/bin/python examples/diffusers_wan.py --tiny           # offline, CPU: a tiny random-weight pipeline
    .venv/bin/python examples/diffusers_wan.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers   # with the weights

`--tiny` builds a random-weight Wan pipeline from config in code (no hub, no text encoder: the prompt's
embeddings are made up from its text, so its videos are noise; the cache calls are real). `--model` loads
a real one (its own text encoder; a GPU wanted). Prompts are looked up by the offline MiniLM
(flexcache.client.diffusers.minilm_embed). Each run stores into a namespace of its own (the process id is
in the model name), so a rerun starts with a miss again. Prints per request: hit or miss, K, transformer
calls, seconds. Exit status 0 when the first request missed and the repeat of it was a whole-prompt hit.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

from flexcache.client import CacheClient
from flexcache.client.diffusers import cached, namespace_for

PROMPTS = [  # (prompt, seed): a miss, its repeat with another seed, a paraphrase
    ("a red fox running through fresh snow in a pine forest", 1),
    ("a red fox running through fresh snow in a pine forest", 2),
    ("a red fox runs across fresh snow among pine trees", 3),
]


def tiny_pipeline() -> WanPipeline:
    """Random weights, built from config in code: two transformer layers, a 3-channel-base VAE."""
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                        in_channels=16, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                        num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                        rope_max_seq_len=32)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0))


def tiny_embeds(prompt: str) -> torch.Tensor:
    """Stand-in text-encoder output for the tiny pipeline (it has no text encoder)."""
    g = torch.Generator().manual_seed(int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16))
    return torch.randn(1, 16, 32, generator=g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051", help="the daemon's gRPC address (HOST:PORT)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tiny", action="store_true", help="a tiny random-weight pipeline, offline, on CPU")
    which.add_argument("--model", help="a diffusers Wan 2.1 model id or folder, e.g. Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--steps", type=int, help="N (default: 10 with --tiny, 50 with --model)")
    args = parser.parse_args(argv)

    if args.tiny:
        pipe, steps = tiny_pipeline(), args.steps or 10
        size = {"height": 16, "width": 16, "num_frames": 9, "guidance_scale": 1.0}
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        pipe = WanPipeline.from_pretrained(args.model, torch_dtype=torch.bfloat16).to(device)
        steps = args.steps or 50
        size = {"height": 480, "width": 832, "num_frames": 81, "guidance_scale": 5.0}
    pipe.set_progress_bar_config(disable=True)
    model = f"{'wan-tiny' if args.tiny else args.model}-{os.getpid()}"
    ns = namespace_for("example", model, steps=steps, width=size["width"], height=size["height"],
                       frames=size["num_frames"])

    # --- diffusers begin ---
    client = CacheClient(args.target, ns, timeout_s=1.0)
    pipe = cached(pipe, client)                       # embed=minilm_embed by default
    results = []
    for prompt, seed in PROMPTS:
        call = {"prompt": prompt, "num_inference_steps": steps, "output_type": "latent",
                "generator": torch.Generator().manual_seed(seed), **size}
        if args.tiny:
            call["prompt_embeds"] = tiny_embeds(prompt)   # the prompt stays the cache key
        _, outcome = pipe.run(**call)                 # pipe(**call) returns the output only; pipe.last the outcome
        pipe.flush()                                  # the example waits for its store; a server would not
        results.append(outcome)
        kind = "miss" if outcome.kind == "miss" else f"{outcome.kind} hit"
        print(f"{kind:9} K = {outcome.start_step:2d}, {outcome.steps_run:2d} of {steps} steps, "
              f"{outcome.transformer_calls:3d} transformer calls, {outcome.seconds:.2f} s"
              f"{', stored' if outcome.stored else ''}: '{prompt}' (seed {seed})")
    # --- diffusers end ---
    pipe.close()
    client.close()
    print(f"namespace: {ns.tenant}/{ns.model}, daemon {args.target}")
    if results[0].kind != "miss" or results[1].kind != "full":
        print(f"expected a miss then a full hit: is the daemon at {args.target} running with its default thresholds?")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
