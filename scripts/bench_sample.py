"""Benchmark class-conditional generation, VAE decode included; one JSON line per sampler and step count.

Times what ``medfusion sample`` does per batch (noise, the sampler's loop with batched
classifier-free guidance, VAE decode) through ``MedfusionPipeline``; file writing is left out.
``--model`` takes a trained model folder; without it a preset builds random networks of the
right size (throughput only). With ``--quality`` every configuration is also compared with a
converged solution of the same model's ODE from the same seeds (DDIM with every training
timestep unless ``--reference`` says otherwise): ``rmse_to_reference`` is the median over the
images of the root-mean-square difference of each decoded image in [-1, 1] (the median, because
with strong guidance a sample near a decision boundary can flip to another mode and dominate a
mean). Deterministic samplers with a smaller distance than
150-step DDIM solve the model's ODE more accurately; the FID comparison comes from the evaluator.

    python scripts/bench_sample.py --preset reference --batch 200 --precision bf16 --channels-last \\
        --compile max-autotune-no-cudagraphs --sampler dpmpp-2m unipc ddim --steps 10 15 25 150
    python scripts/bench_sample.py --model RUN/model --quality --sampler ddim dpmpp-2m --steps 10 25 150
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from diffusers import DDPMScheduler

from medfusion.autoencoders import VAE
from medfusion.diffusion import DiffusionConfig, UNet
from medfusion.samplers import (
    KARRAS_SAMPLERS,
    SAMPLERS,
    MedfusionPipeline,
    ModelFolder,
    ModelInfo,
    SamplerConfig,
    load_model_folder,
)

PRESETS = {
    # Medfusion's 256x256 setting: an f=8 VAE with 8 latent channels, the U-Net of bench_train.py
    "reference": dict(
        spatial_dims=2,
        image=256,
        channels=1,
        latent=8,
        vae=(64, 128, 256, 512),
        unet=(256, 256, 512, 1024),
        layers=2,
    ),
    "tiny": dict(spatial_dims=2, image=32, channels=1, latent=4, vae=(16, 32), unet=(32, 64), layers=1),
    "tiny-3d": dict(spatial_dims=3, image=16, channels=1, latent=4, vae=(8, 16), unet=(16, 32), layers=1),
}


def preset_model(name: str, classes: int) -> ModelFolder:
    p = PRESETS[name]
    d, f = p["spatial_dims"], 2 ** (len(p["vae"]) - 1)
    vae = VAE(
        spatial_dims=d,
        in_channels=p["channels"],
        block_out_channels=p["vae"],
        latent_channels=p["latent"],
        norm_num_groups=min(32, p["vae"][0]),
    )
    unet = UNet(
        spatial_dims=d,
        in_channels=p["latent"],
        block_out_channels=p["unet"],
        layers_per_block=p["layers"],
        norm_num_groups=min(32, p["unet"][0]),
        num_classes=classes,
    )
    latent = (p["latent"], *(p["image"] // f,) * d)
    info = ModelInfo(
        spatial_dims=d,
        image_size=(p["image"],) * d,
        channels=p["channels"],
        latent_shape=latent,
        class_names=tuple(f"class{i}" for i in range(classes)),
    )
    schedule = DDPMScheduler.from_config(DiffusionConfig().scheduler_config())
    with torch.no_grad():  # untrained weights, but no zero-initialised output layers
        for parameter in [*unet.parameters(), *vae.parameters()]:
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return ModelFolder(unet.eval(), vae.eval(), schedule, info)


def model_calls(sampler: SamplerConfig, schedule: dict) -> int:
    """U-Net evaluations per sample (conditional and null-class passes share one call)."""
    scheduler = sampler.scheduler(schedule)
    scheduler.set_timesteps(sampler.steps)
    return len(scheduler.timesteps)


def timed(pipe: MedfusionPipeline, labels: list, seeds: list, sampler: SamplerConfig, device) -> tuple:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = pipe.decode(pipe.sample_latents(labels, seeds, sampler))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="a trained model folder (default: random networks of --preset)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--classes", type=int, default=2, help="classes of a preset model")
    parser.add_argument(
        "--sampler", nargs="+", default=["ddim", "dpmpp-2m", "unipc"], choices=sorted(SAMPLERS)
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[25])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=2, help="timed batches per configuration (median)")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--karras-sigmas", action="store_true", help="for dpmpp-2m, euler, heun, unipc")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", default=None, help="torch.compile mode for the U-Net, e.g. max-autotune")
    parser.add_argument("--quality", action="store_true", help="also the distance to a converged reference")
    parser.add_argument("--reference", default="ddim:1000", metavar="SAMPLER:STEPS")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = load_model_folder(args.model) if args.model else preset_model(args.preset, args.classes)
    pipe = MedfusionPipeline(
        model,
        device=device,
        precision=args.precision,
        channels_last=args.channels_last,
        compile_mode=args.compile,
    )
    names = model.info.class_names or (None,)
    labels = [names[i % len(names)] for i in range(args.batch)]
    seeds = list(range(args.batch))
    reference = None
    if args.quality:
        name, steps = args.reference.split(":")
        ref = SamplerConfig(name, int(steps), args.guidance)
        reference = pipe.decode(pipe.sample_latents(labels, seeds, ref))
    for name, steps in itertools.product(args.sampler, args.steps):
        karras = args.karras_sigmas and name in KARRAS_SAMPLERS
        sampler = SamplerConfig(name, steps, args.guidance, karras_sigmas=karras)
        timed(pipe, labels, seeds, sampler, device)  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.batches):
            images, seconds = timed(pipe, labels, seeds, sampler, device)
            times.append(seconds)
        seconds = sorted(times)[len(times) // 2]
        row = {
            "model": args.model or args.preset,
            "sampler": name + (" karras" if karras else ""),
            "steps": steps,
            "model_calls": model_calls(sampler, model.scheduler_config),
            "batch": args.batch,
            "precision": args.precision,
            "compile": args.compile,
            "channels_last": args.channels_last,
            "guidance": args.guidance,
            "device": str(device),
            "images_per_s": round(args.batch / seconds, 2),
            "s_per_batch": round(seconds, 4),
        }
        if device.type == "cuda":
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        if reference is not None:
            per_image = (images - reference).flatten(1).pow(2).mean(1).sqrt()
            row["rmse_to_reference"] = round(float(per_image.median()), 5)  # median over the images
            row["rmse_to_reference_max"] = round(float(per_image.max()), 5)
            row["reference"] = args.reference
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
