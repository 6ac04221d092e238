"""Benchmark the diffusion U-Net's training step on random latents; one JSON line per run.

A step is what ``medfusion train`` does per batch once the latents exist: draw timesteps and
noise, predict with the U-Net (class-conditional), MSE against the noise, backward, AdamW step.
FLOPs are counted once per configuration with ``torch.utils.flop_counter`` on an eager
forward+backward without gradient checkpointing (model FLOPs: recomputation is not counted), so
MFU compares configurations fairly.

    python scripts/bench_train.py --preset reference --batch 32 --precision bf16 --channels-last \\
        --compile max-autotune-no-cudagraphs
    python scripts/bench_train.py --preset reference-3d --batch 8 --precision bf16 --gradient-checkpointing
    python scripts/bench_train.py --preset tiny            # a CPU smoke run

``--model diffusers`` runs diffusers' UNet2DModel at the same widths for comparison (2D only).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from medfusion.diffusion import DiffusionConfig, DiffusionObjective, UNet

PRESETS = {
    # Medfusion's configuration for 256x256 chest X-rays: latents 8x32x32, no attention, 2 classes
    "reference": dict(spatial_dims=2, size=32, channels=8, widths=(256, 256, 512, 1024), layers=2),
    "reference-3d": dict(spatial_dims=3, size=32, channels=8, widths=(256, 256, 512, 1024), layers=2),
    "tiny": dict(spatial_dims=2, size=16, channels=4, widths=(32, 64), layers=1),
    "tiny-3d": dict(spatial_dims=3, size=8, channels=4, widths=(16, 32), layers=1),
}
# dense peak TFLOP/s per device family and precision (fp32 runs use TF32 tensor cores)
PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp32": 494.7}, "H200": {"bf16": 989.4, "fp32": 494.7}}


class _DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel at the same widths, returning a tensor like ours."""

    def __init__(self, channels: int, widths: tuple[int, ...], layers: int, num_classes: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(
            in_channels=channels,
            out_channels=channels,
            block_out_channels=widths,
            layers_per_block=layers,
            down_block_types=("DownBlock2D",) * len(widths),
            up_block_types=("UpBlock2D",) * len(widths),
            num_class_embeds=num_classes + 1,
        )

    def forward(self, x, t, labels):
        return self.net(x, t, class_labels=labels).sample


def build_model(args: argparse.Namespace, preset: dict) -> nn.Module:
    if args.model == "diffusers":
        if preset["spatial_dims"] != 2:
            raise SystemExit("--model diffusers: diffusers has no 3D UNet2DModel counterpart")
        return _DiffusersUNet(preset["channels"], preset["widths"], preset["layers"], args.classes)
    return UNet(
        spatial_dims=preset["spatial_dims"],
        in_channels=preset["channels"],
        block_out_channels=preset["widths"],
        layers_per_block=preset["layers"],
        norm_num_groups=min(32, preset["widths"][0]),
        num_classes=args.classes,
    )


def peak_tflops(device: torch.device, precision: str, override: float | None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for family, peaks in PEAK_TFLOPS.items():
        if family in name:
            return peaks[precision]
    return None


def run(args: argparse.Namespace, batch: int, device: torch.device) -> dict:
    preset = dict(PRESETS[args.preset])
    torch.manual_seed(0)
    model = build_model(args, preset).to(device)
    memory_format = torch.channels_last if preset["spatial_dims"] == 2 else torch.channels_last_3d
    if args.channels_last:
        model = model.to(memory_format=memory_format)
    objective = DiffusionObjective(DiffusionConfig())
    shape = (batch, preset["channels"], *(preset["size"],) * preset["spatial_dims"])
    x = torch.randn(shape, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=memory_format)
    labels = torch.randint(0, args.classes, (batch,), device=device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
    autocast = torch.autocast(
        device.type,
        dtype=torch.bfloat16,
        enabled=args.precision == "bf16",
        cache_enabled=not args.no_autocast_cache,
    )

    def forward_backward(net: nn.Module) -> torch.Tensor:
        with autocast:
            loss, _ = objective.loss(net, x, labels, args.classes)
        loss.backward()
        return loss

    with FlopCounterMode(display=False) as counter:  # eager, no checkpointing: model FLOPs
        forward_backward(model)
    flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)

    if args.gradient_checkpointing:
        if not hasattr(model, "enable_gradient_checkpointing"):
            raise SystemExit("--gradient-checkpointing is supported for --model medfusion only")
        model.enable_gradient_checkpointing()
    net = model if args.compile == "none" else torch.compile(model, mode=args.compile)
    optimizer_step = optimizer.step
    if args.optimizer_in_backward:  # step each parameter as soon as its gradient is complete
        per_parameter = {p: torch.optim.AdamW([p], lr=1e-4, fused=fused) for p in model.parameters()}

        def step_now(p: torch.Tensor) -> None:
            per_parameter[p].step()
            per_parameter[p].zero_grad(set_to_none=True)

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(step_now)
        optimizer_step = lambda: None  # noqa: E731
    if args.compile_optimizer:
        optimizer_step = torch.compile(optimizer.step, mode="max-autotune-no-cudagraphs")

    def step() -> torch.Tensor:
        loss = forward_backward(net)
        optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    compile_start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warmup_s = time.perf_counter() - compile_start
    window_ms = []
    for _ in range(args.windows):
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        window_ms.append((time.perf_counter() - start) * 1000 / args.steps)
    step_ms = statistics.median(window_ms)
    tflops = flops / (step_ms / 1000) / 1e12
    peak = peak_tflops(device, args.precision, args.peak_tflops)
    return {
        "model": args.model,
        "preset": args.preset,
        "latents": list(shape[1:]),
        "widths": list(preset["widths"]),
        "batch": batch,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "compile_optimizer": args.compile_optimizer,
        "gradient_checkpointing": args.gradient_checkpointing,
        "optimizer_in_backward": args.optimizer_in_backward,
        "autocast_cache": not args.no_autocast_cache,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_s": round(batch / (step_ms / 1000), 1),
        "step_ms": round(step_ms, 2),
        "step_ms_windows": [round(w, 2) for w in window_ms],
        "gflop_per_step": round(flops / 1e9, 1),
        "tflops": round(tflops, 1),
        "mfu": round(tflops / peak, 4) if peak else None,
        "peak_mem_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2)
        if device.type == "cuda"
        else None,
        "warmup_s": round(warmup_s, 1),
        "loss": round(float(loss.detach()), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--model", choices=("medfusion", "diffusers"), default="medfusion")
    parser.add_argument("--batch", type=int, nargs="+", default=[32], help="one run per batch size")
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument(
        "--compile",
        choices=("none", "default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead"),
        default="none",
    )
    parser.add_argument("--compile-optimizer", action="store_true", help="torch.compile the AdamW step")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--optimizer-in-backward",
        action="store_true",
        help="experiment: AdamW-step each parameter in the backward pass, so gradients never all coexist",
    )
    parser.add_argument(
        "--no-autocast-cache",
        action="store_true",
        help="do not keep bf16 copies of the weights during a step (less memory, more casts)",
    )
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (compilation happens here)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per window")
    parser.add_argument("--windows", type=int, default=3, help="timing windows; the median is reported")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for MFU (default: known GPUs)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for batch in args.batch:
        try:
            print(json.dumps(run(args, batch, device)), flush=True)
        except torch.OutOfMemoryError:
            print(json.dumps({"preset": args.preset, "batch": batch, "error": "out of memory"}), flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        torch._dynamo.reset()


if __name__ == "__main__":
    main()
