#!/usr/bin/env python
"""Retrofit ESRGAN with SeD: train RRDBNet against a semantic-aware discriminator (the paper's recipe).

    # a few minutes on a laptop CPU, no data or network needed (bundled photos, random weights if offline)
    python examples/retrofit_esrgan.py --preset demo

    # one GPU, starting from PSNR-trained ESRGAN weights, as in the paper
    python examples/retrofit_esrgan.py --hr-dir DF2K/HR --generator-weights RRDB_PSNR_x4.pth \\
        --discriminator sed-patch --amp bf16 --out runs/rrdb_sed_patch

    # several GPUs (the batch size is per process), then resume after an interruption
    torchrun --nproc_per_node=4 examples/retrofit_esrgan.py --hr-dir DF2K/HR ... --out runs/x
    torchrun --nproc_per_node=4 examples/retrofit_esrgan.py --hr-dir DF2K/HR ... --out runs/x --resume

The generator is ESRGAN's RRDBNet (spandrel's, so ESRGAN / Real-ESRGAN / KAIR weights load with
--generator-weights). SeD's part of the training step is the block marked ``SeD`` in
:meth:`Trainer.train_step`; everything else is ESRGAN's recipe. See docs/training.md.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sr_kit import checkpoint as ckpt  # noqa: E402
from sr_kit import data as sr_data  # noqa: E402
from sr_kit import dist as sr_dist  # noqa: E402
from sr_kit import models  # noqa: E402
from sr_kit.cli import DefaultsHelpFormatter, positive_int  # noqa: E402
from sr_kit.metrics import psnr_y  # noqa: E402
from sr_kit.plots import plot_losses, save_sample_grid  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

from sed_discriminator import discriminator_loss, frozen_parameters, generator_loss  # noqa: E402
from sed_discriminator.diagnostics import semantic_diagnostics  # noqa: E402
from sed_discriminator.spectral_norm import power_iteration_paused  # noqa: E402

LOG_COLUMNS = (
    "step", "phase", "lr_g", "l_pix", "l_percep", "l_gan", "l_g_total", "l_d", "d_real", "d_fake", "val_psnr",
    "sem_influence", "attn_sharpness_att1", "attn_sharpness_att2", "attn_sharpness_att3", "sec_per_step", "img_per_sec",
)  # fmt: skip

# The demo preset: small networks, 96 px patches, the photos scikit-image ships; a few minutes on 2 CPU cores.
DEMO_PRESET: dict[str, Any] = dict(
    out="runs/demo", discriminator="sed-patch", patch_size=96, batch_size=4, num_feat=32, num_blocks=2, d_width=32,
    lr=4e-4, total_steps=340, psnr_steps=200, milestones=[200], log_every=5, diagnostics_every=10, sample_every=40,
    checkpoint_every=100, workers=1, cache_images=True, allow_random_weights=True, num_samples=2, sample_size=160,
)  # fmt: skip

# Settings that define the networks: a resumed run must use the checkpoint's (G's width and depth
# are compared as given: with --generator-weights, the architecture came from that file).
_ARCH_KEYS = ("discriminator", "d_width", "scale", "extractor", "num_feat", "num_blocks")
# Settings that define the data order: changing them on resume changes what the run sees.
_ORDER_KEYS = ("seed", "batch_size", "patch_size")
# What a run writes into --out: an existing one is a run that --overwrite or --resume must name.
RUN_OUTPUTS = ("checkpoints", "samples", "log.csv", "loss_curves.png", "config.json", "generator_final.pth",
               "generator_final.safetensors")  # fmt: skip
# DDP's switch for re-broadcasting buffers at every forward (renamed in torch 2.14).
_NO_BUFFER_SYNC = next(k for k in ("forward_sync_buffers", "broadcast_buffers")
                       if k in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters)  # fmt: skip


class UsageError(RuntimeError):
    """A problem with the command line or the run folder (printed without a traceback)."""


# ------------------------------------------------------------------------------------ arguments


# fmt: off
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train ESRGAN's RRDBNet with SeD (or a baseline discriminator), following the SeD paper's recipe.",
        formatter_class=DefaultsHelpFormatter,
    )
    demo = ", ".join(f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                     for k, v in DEMO_PRESET.items() if not isinstance(v, bool))  # fmt: skip
    p.add_argument("--preset", choices=["demo"], help="demo: a few minutes on CPU on photos bundled with scikit-image; "
                   f"sets {demo}, --cache-images, --allow-random-weights (each can still be given)")  # fmt: skip

    g = p.add_argument_group("data")
    g.add_argument("--hr-dir", help="folder of HR training images (DIV2K/DF2K style)")
    g.add_argument("--val-dir", help="images for the sample grid and validation PSNR (default: the training images)")
    g.add_argument("--scale", type=positive_int, default=4, help="SR factor")
    g.add_argument("--patch-size", type=int, default=256, help="HR training patch (LR patch = this / scale)")
    g.add_argument("--batch-size", type=positive_int, default=8, help="batch per process (per GPU)")
    g.add_argument("--workers", type=int, default=4, help="data-loading worker processes per process")
    g.add_argument("--no-augment", action="store_true", help="no random flips / rotations")
    g.add_argument("--cache-images", action="store_true", help="keep decoded images in memory (small datasets)")

    g = p.add_argument_group("networks")
    g.add_argument("--generator-weights", help="start G from these weights (PSNR-trained ESRGAN, Real-ESRGAN, ...)")
    g.add_argument("--num-feat", type=int, default=64, help="RRDBNet width (when not loading weights)")
    g.add_argument("--num-blocks", type=int, default=23, help="RRDBNet blocks (when not loading weights)")
    g.add_argument("--discriminator", choices=list(models.DISCRIMINATORS), default="sed-patch",
                   help="; ".join(f"{k}: {v}" for k, v in models.DISCRIMINATORS.items()))
    g.add_argument("--d-width", type=int, default=64, help="discriminator base width")
    g.add_argument("--extractor", default="clip_rn50", help="SeD's semantic extractor: a preset or timm:NAME")
    g.add_argument("--extractor-weights", default="default", help="'default' (the preset's), timm tag, file, 'random'")
    g.add_argument("--vgg-weights", default="imagenet", help="'imagenet' (torchvision), a vgg19 .pth file, or 'random'")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="if pretrained extractor / VGG19 weights cannot be loaded, use RANDOM ones (smoke runs only)")
    g.add_argument("--trust-pickle", action="store_true", help="read the weight files given here even where a crafted "
                   "one could run code: .pt/.pth on torch < 2.10, TorchScript (OpenAI's RN50.pt); only files you trust")

    g = p.add_argument_group("losses (defaults: the paper's recipe)")
    g.add_argument("--pixel-weight", type=float, default=1.0, help="L1 weight")
    g.add_argument("--perceptual-weight", type=float,
                   help="VGG19 perceptual weight (default 1.0 for the pixel discriminators, 0.1 otherwise; 0: off)")
    g.add_argument("--gan-loss", choices=["vanilla", "ragan", "lsgan", "hinge"], default="vanilla",
                   help="vanilla: BCE (the paper); ragan: ESRGAN's relativistic average")
    g.add_argument("--gan-weight", type=float, default=0.01, help="weight of G's adversarial loss")

    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate of G")
    g.add_argument("--lr-d", type=float, help="Adam learning rate of D (default: --lr)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.99), help="Adam betas")
    g.add_argument("--total-steps", type=positive_int, default=300_000, help="training iterations")
    g.add_argument("--milestones", type=int, nargs="*", default=[100_000, 200_000], help="steps where lr *= --gamma")
    g.add_argument("--gamma", type=float, default=0.5, help="lr factor at each milestone")
    g.add_argument("--psnr-steps", type=int, default=0, help="train G with L1 alone for the first N steps (ESRGAN's)")
    g.add_argument("--ema", type=float, default=0.0, help="EMA decay of G's weights (e.g. 0.999); 0 disables it")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="runs/esrgan_sed", help="run folder: checkpoints/, samples/, log.csv, plots")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from the newest valid checkpoint of --out (or from PATH)")
    g.add_argument("--overwrite", action="store_true", help="delete an earlier run's outputs in --out, start again")
    g.add_argument("--run-steps", type=positive_int, help="stop (with a checkpoint) after N steps of this invocation")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    g.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off", help="mixed precision (bf16: Ampere+)")
    g.add_argument("--channels-last", action="store_true", help="channels_last memory format (tensor cores)")
    g.add_argument("--compile", action="store_true", help="torch.compile the generator")
    g.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    g.add_argument("--seed", type=int, default=0, help="seed of the initial weights, the data order, crops and flips")
    g.add_argument("--log-every", type=positive_int, default=100, help="steps between log.csv rows")
    g.add_argument("--diagnostics-every", type=int, default=100, help="steps between SeD's semantic influence and "
                   "attention sharpness in log.csv (0: off; needs a batch of 2+; cost: docs/training.md)")
    g.add_argument("--sample-every", type=int, default=1000, help="steps between sample grids and plots (0: at end)")
    g.add_argument("--checkpoint-every", type=positive_int, default=5000, help="steps per checkpoint (and one at end)")
    g.add_argument("--keep-last", type=positive_int, default=3, help="checkpoints kept")
    g.add_argument("--num-samples", type=int, default=4, help="images in the sample grid")
    g.add_argument("--sample-size", type=int, default=192, help="HR size of each sample (centre crop)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p
# fmt: on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.preset == "demo":
        parser.set_defaults(**DEMO_PRESET)
    args = parser.parse_args(argv)
    if args.perceptual_weight is None:
        args.perceptual_weight = 1.0 if args.discriminator.endswith("pixel") else 0.1
    if args.lr_d is None:
        args.lr_d = args.lr
    return args


def check_args(args: argparse.Namespace) -> None:
    if args.preset is None and not args.hr_dir:
        raise UsageError("Pass --hr-dir FOLDER with your HR training images (or --preset demo for a demo run).")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite deletes it: pass one of them.")
    if args.patch_size < 32:
        raise UsageError(f"--patch-size must be at least 32 for the {args.discriminator!r} discriminator.")
    if args.psnr_steps > args.total_steps:
        raise UsageError("--psnr-steps cannot exceed --total-steps.")
    if args.diagnostics_every < 0:
        raise UsageError("--diagnostics-every must be 0 (off) or more.")
    # The centre crop is cut to a multiple of the scale and PSNR drops `scale` px on each side: 3 LR px at least.
    if args.num_samples > 0 and args.sample_size < 3 * args.scale:
        raise UsageError(f"--sample-size {args.sample_size} is too small for x{args.scale}: validation PSNR ignores a "
                         f"{args.scale} px border, so the samples need at least {3 * args.scale} px (or pass "
                         "--num-samples 0).")  # fmt: skip


# ------------------------------------------------------------------------------- the run folder


def open_run_folder(
    args: argparse.Namespace, info: sr_dist.DistInfo
) -> tuple[ckpt.RunLock | None, tuple[Path, dict[str, Any]] | None]:
    """Lock ``--out`` (rank 0, for the whole run), remove leftovers of killed writes, check earlier outputs.

    A folder holding any of :data:`RUN_OUTPUTS` is an error unless ``--resume`` continues that run
    or ``--overwrite`` deletes those outputs (and nothing else). Returns ``(lock or None, (path,
    state) of the checkpoint to resume or None)``.
    """
    out = Path(args.out)
    ckpt_dir = out / "checkpoints"
    lock = None
    if info.is_main:
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {str(out)!r} is a file; pass a folder.")
        lock = ckpt.RunLock(out)  # RunFolderBusy when another run holds it
    try:
        if info.is_main:  # rank 0 alone decides and deletes; the others wait at the barrier
            removed = ckpt.remove_stale_temporaries([out, ckpt_dir, out / "samples"]) if lock.held else []
            if removed:
                names = ", ".join(p.name for p in removed[:5]) + (" ..." if len(removed) > 5 else "")
                print(f"Removed {len(removed)} temporary file(s) left by an interrupted run: {names}", file=sys.stderr)
            existing = [n for n in RUN_OUTPUTS if (out / n).is_file() or any((out / n).glob("*"))]  # empty: not output
            if args.resume is None and existing and not args.overwrite:
                newest = "".join(f" (newest checkpoint: {p.name})" for _, p in ckpt.list_checkpoints(ckpt_dir)[-1:])
                raise UsageError(
                    f"{out} already holds the outputs of a run: {', '.join(existing)}{newest}. Pass --resume to "
                    "continue that run, --overwrite to delete these outputs and start again, or choose another --out."
                )
            if args.resume is None and existing:
                for name in existing:
                    target = out / name
                    shutil.rmtree(target) if target.is_dir() else target.unlink()
                print(f"--overwrite: deleted {', '.join(existing)} in {out}.", file=sys.stderr)
        sr_dist.barrier(info)
        resume = None
        if args.resume is not None:
            if args.resume == "auto":
                resume = ckpt.find_resumable(ckpt_dir)
            else:
                resume = Path(args.resume), ckpt.load_checkpoint(args.resume)
            _check_resume_config(args, resume[1]["config"], info)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, resume


def _check_resume_config(args: argparse.Namespace, saved: dict[str, Any], info: sr_dist.DistInfo) -> None:
    arch = [f"--{k.replace('_', '-')} {saved.get(k)!r} (checkpoint) vs {getattr(args, k)!r} (command line)"
            for k in _ARCH_KEYS if k in saved and saved[k] != getattr(args, k)]  # fmt: skip
    if arch:
        raise UsageError("The checkpoint was trained with other networks; resume with its settings:\n  "
                         + "\n  ".join(arch))  # fmt: skip
    order = [k for k in _ORDER_KEYS if k in saved and saved[k] != getattr(args, k)]
    if order and info.is_main:
        warnings.warn(f"Resuming with changed {order}: the data order differs from an uninterrupted run.",
                      stacklevel=3)  # fmt: skip


# ---------------------------------------------------------------------------------- the trainer


class StopFlag:
    """Set by SIGINT / SIGTERM: the run saves a checkpoint at the end of the current step and exits."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        print(f"\nReceived {signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
              "(Ctrl-C again to stop now).", file=sys.stderr, flush=True)  # fmt: skip

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _without_milestones(sched: torch.optim.lr_scheduler.MultiStepLR) -> dict[str, Any]:
    """The scheduler's state minus its milestones (a ``Counter``, which older torch's (2.2) ``weights_only`` load
    refuses); they come from the command line on resume anyway."""
    return {k: v for k, v in sched.state_dict().items() if k != "milestones"}


class Trainer:
    """Everything of one run: networks, optimisers, data stream, logging and checkpoints."""

    def __init__(self, args: argparse.Namespace, info: sr_dist.DistInfo,
                 resume: tuple[Path, dict[str, Any]] | None = None) -> None:  # fmt: skip
        self.args, self.info, self.device = args, info, info.device
        self.out = Path(args.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.random_weights: list[str] = []
        self.step = 0
        self.committing = False  # inside the optimiser steps of a step: the state is half updated
        self.resumed_from, resume_state = resume if resume is not None else (None, None)
        torch.manual_seed(args.seed)  # identical initial weights on every rank

        hr_paths = sr_data.list_images(args.hr_dir, "HR folder (--hr-dir)")
        self.dataset = sr_data.SRTrainDataset(hr_paths, args.patch_size, args.scale, seed=args.seed,
                                              augment=not args.no_augment, cache=args.cache_images)  # fmt: skip
        if len(self.dataset) < info.world_size:
            raise UsageError(f"{len(self.dataset)} usable image(s) for {info.world_size} processes; add images.")
        if resume_state is not None:
            self.g = models.load_generator_weights(resume_state["generator"], args.scale, name=str(self.resumed_from))
        elif args.generator_weights:
            try:
                self.g = models.load_generator_weights(args.generator_weights, args.scale,
                                                       trust_pickle=args.trust_pickle)  # fmt: skip
            except (FileNotFoundError, ValueError) as err:
                raise UsageError(str(err)) from err
        else:
            self.g = models.build_generator(args.num_feat, args.num_blocks, args.scale)
        weights = (args.allow_random_weights, args.trust_pickle)
        self.extractor = self.perceptual = None
        if args.discriminator.startswith("sed-"):
            self.extractor, is_random = models.load_extractor(args.extractor, args.extractor_weights, *weights)
            self.random_weights += [f"semantic extractor {args.extractor}"] if is_random else []
        self.d = models.build_discriminator(args.discriminator, args.d_width, self.extractor)
        if args.perceptual_weight > 0:
            features, is_random = models.load_vgg19_features(args.vgg_weights, *weights)
            self.random_weights += ["VGG19 (perceptual loss)"] if is_random else []
            self.perceptual = models.perceptual_loss(features).to(self.device)
        self.memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        for model in (self.g, self.d):  # D also moves SeD's extractor
            model.to(self.device, memory_format=self.memory_format).train()

        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=args.lr, betas=tuple(args.betas))
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=args.lr_d, betas=tuple(args.betas))
        self.sched_g = torch.optim.lr_scheduler.MultiStepLR(self.opt_g, args.milestones, args.gamma)
        self.sched_d = torch.optim.lr_scheduler.MultiStepLR(self.opt_d, args.milestones, args.gamma)
        # One scaler for both losses; torch.amp.GradScaler is torch >= 2.3 (the floor, 2.2, has the CUDA one).
        fp16 = args.amp == "fp16"
        if hasattr(torch.amp, "GradScaler"):
            self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        else:
            self.scaler = torch.cuda.amp.GradScaler(enabled=fp16 and self.device.type == "cuda")
        self.ema = models.make_ema(self.g, args.ema) if args.ema > 0 else None
        self.diagnose_every = args.diagnostics_every if self.extractor is not None and args.batch_size > 1 else 0
        if self.extractor is not None and args.diagnostics_every and not self.diagnose_every and info.is_main:
            print("note: SeD's diagnostics compare the images of a batch: with --batch-size 1 they are off.",
                  file=sys.stderr)  # fmt: skip

        torch.manual_seed(args.seed + 1000 * info.rank)
        if resume_state is not None:
            self._load_state(resume_state)
        self.g_train, self.d_train = self.g, self.d
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.g_train = nn.parallel.DistributedDataParallel(self.g, device_ids=ids)
            # Spectral-norm vectors stay equal on all ranks (same weights, same power iteration): no re-broadcast.
            self.d_train = nn.parallel.DistributedDataParallel(self.d, device_ids=ids, **{_NO_BUFFER_SYNC: False})
        if args.compile:
            self.g_train = torch.compile(self.g_train)  # D stays eager: compile + DDP + spectral norm is unreliable
        stream = sr_data.SampleStream(len(self.dataset), args.seed, info.rank, info.world_size,
                                      start=self.step * args.batch_size)  # fmt: skip
        self.loader = sr_data.make_loader(self.dataset, stream, args.batch_size, args.workers,
                                          pin_memory=self.device.type == "cuda")  # fmt: skip
        self.val_pairs = []
        if info.is_main:  # samples: centre crops that PSNR can score (3 LR px: it ignores a `scale` px border)
            val_paths = sr_data.list_images(args.val_dir, "validation folder (--val-dir)") if args.val_dir else None
            self.val_pairs = sr_data.center_crops(val_paths or self.dataset.hr_paths, args.sample_size, args.scale,
                                                  args.num_samples, min_side=3 * args.scale)  # fmt: skip

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        rng = sr_dist.gather_objects(ckpt.rng_state(), self.info)  # a collective call: every rank takes part
        return {
            "format": ckpt.FORMAT, "step": self.step,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(self.args).items()},
            "generator": self.g.state_dict(), "discriminator": self.d.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "sched_g": _without_milestones(self.sched_g), "sched_d": _without_milestones(self.sched_d),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": rng,
            "data": {"seed": self.args.seed, "samples_per_rank": self.step * self.args.batch_size,
                     "world_size": self.info.world_size, "fingerprint": sr_data.fingerprint(self.dataset.hr_paths)},
            "random_weights": list(self.random_weights), "torch": str(torch.__version__),
        }  # fmt: skip

    def _load_state(self, state: dict[str, Any]) -> None:
        for name in ("generator", "discriminator", "opt_g", "opt_d", "sched_g", "sched_d", "scaler"):
            getattr(self, {"generator": "g", "discriminator": "d"}.get(name, name)).load_state_dict(state[name])
        for sched in (self.sched_g, self.sched_d):  # milestones come from the command line: a resume may change them
            sched.milestones = type(sched.milestones)(self.args.milestones)
            sched.gamma = self.args.gamma
        main = self.info.is_main
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        elif main and state.get("ema") is not None:
            warnings.warn("The checkpoint has an EMA of G but --ema is 0: the EMA is dropped.", stacklevel=2)
        elif main and self.ema is not None:
            warnings.warn("--ema is on but the checkpoint has no EMA: it starts from the current weights.",
                          stacklevel=2)  # fmt: skip
        self.step = int(state["step"])
        if main and state["data"]["fingerprint"] != sr_data.fingerprint(self.dataset.hr_paths):
            warnings.warn("The training images differ from those of the checkpoint; the data order differs.",
                          stacklevel=2)  # fmt: skip
        if len(state["rng"]) == self.info.world_size:
            ckpt.set_rng_state(state["rng"][self.info.rank])
        elif main:
            warnings.warn(f"The checkpoint was written by {len(state['rng'])} process(es), this run has "
                          f"{self.info.world_size}: the data order and RNG streams differ from an uninterrupted run.",
                          stacklevel=2)  # fmt: skip

    def save_checkpoint(self) -> Path | None:
        state = self.state_dict()
        path = None
        if self.info.is_main:
            path = ckpt.atomic_save(state, self.ckpt_dir / ckpt.checkpoint_name(self.step))
            ckpt.prune_checkpoints(self.ckpt_dir, self.args.keep_last)
        sr_dist.barrier(self.info)
        return path

    def export_generator(self) -> tuple[Path, Path]:
        """G's weights for users: ``generator_final.pth`` (BasicSR's ``params`` / ``params_ema``, for spandrel,
        chaiNNer, BasicSR) and ``generator_final.safetensors`` (the EMA weights when there is one; no pickle)."""
        from safetensors.torch import save

        weights = {"params": self.g.state_dict()}
        if self.ema is not None:
            weights["params_ema"] = self.ema.module.state_dict()
        pth = ckpt.atomic_save(weights, self.out / "generator_final.pth")
        shared = {k: v.contiguous() for k, v in weights.get("params_ema", weights["params"]).items()}
        meta = {"weights": "ema" if self.ema else "raw", "step": str(self.step), "scale": str(self.args.scale)}
        tensors = ckpt.atomic_write(self.out / "generator_final.safetensors", lambda h: h.write(save(shared, meta)))
        return pth, tensors

    # -- training -----------------------------------------------------------------------------

    def _autocast(self):
        if self.args.amp == "off":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if self.args.amp == "bf16" else torch.float16)

    def train_step(self, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, float]:
        """One step: the forward and backward passes of G and D first, then all optimiser steps.

        Until the optimiser steps, an exception leaves the run as it was after the previous step
        (the buffers the forwards updated are restored), so that state can still be saved.
        """
        args = self.args
        lr, hr = (x.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format) for x in (lr, hr))
        gan_phase = self.step >= args.psnr_steps
        # What the forwards change before the optimiser steps: spectral-norm vectors, BatchNorm statistics.
        buffers = [b for model in (self.g, self.d) for m in model.modules() if m.training for b in m.buffers(False)]
        saved = [b.clone() for b in buffers]
        try:
            with self._autocast():
                sr = self.g_train(lr)
                losses = {"l_pix": args.pixel_weight * F.l1_loss(sr.float(), hr.float())}
                if gan_phase and self.perceptual is not None:
                    losses["l_percep"] = args.perceptual_weight * self.perceptual(sr, hr)[0]
                if gan_phase:
                    # ---- SeD: the HR batch's semantics condition all three D calls of this step --------------
                    if self.extractor is not None:
                        self.d.set_condition(hr)
                    with frozen_parameters(self.d):  # G's adversarial loss: D's parameters get no gradient
                        fake = self.d(sr)  # the G-side call bypasses DDP
                        real = self.d(hr).detach().float() if args.gan_loss == "ragan" else None
                    losses["l_gan"] = generator_loss(fake.float(), real_logits=real, kind=args.gan_loss,
                                                     weight=args.gan_weight)  # fmt: skip
            l_g_total = sum(losses.values())
            self.opt_g.zero_grad(set_to_none=True)
            self.scaler.scale(l_g_total).backward()
            logs = {key: value.item() for key, value in losses.items()} | {"l_g_total": l_g_total.item()}
            if gan_phase:  # D: real vs the detached fake, under the same semantics
                with self._autocast():
                    real, fake = self.d_train(hr), self.d_train(sr.detach())
                    l_d = discriminator_loss(fake_logits=fake.float(), real_logits=real.float(), kind=args.gan_loss)
                self.opt_d.zero_grad(set_to_none=True)
                self.scaler.scale(l_d).backward()
                logs |= {"l_d": l_d.item(), "d_real": torch.sigmoid(real.detach().float()).mean().item(),
                         "d_fake": torch.sigmoid(fake.detach().float()).mean().item()}  # fmt: skip
                if self.diagnose_every and self.step % self.diagnose_every == self.diagnose_every - 1:
                    logs |= semantic_diagnostics(self.d, hr)  # no gradient, no state change; the condition of this step
                # ---- end of SeD's part ---------------------------------------------------------------------
        except BaseException:
            with torch.no_grad():
                for buffer, value in zip(buffers, saved):
                    buffer.copy_(value)
            raise
        finally:
            if self.extractor is not None:
                self.d.clear_condition()

        self.committing = True
        self.scaler.step(self.opt_g)
        if gan_phase:
            self.scaler.step(self.opt_d)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update_parameters(self.g)
        self.sched_g.step()
        with warnings.catch_warnings():  # D's optimiser has not stepped yet during the PSNR stage
            warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"), UserWarning)
            self.sched_d.step()
        self.step += 1
        self.committing = False
        return logs

    def _realness(self, sr: torch.Tensor, hr: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(map,)``: a pixel D's per-pixel probability that ``sr`` is real; ``()`` for other Ds."""
        if not self.args.discriminator.endswith("pixel"):
            return ()
        # The spectral-norm vectors are not updated (the run stays bit-for-bit resumable).
        with power_iteration_paused(), self.d.condition(hr) if self.extractor is not None else nullcontext():
            return (torch.sigmoid(self.d(sr).float())[0, 0].cpu(),)

    @torch.no_grad()
    def write_samples(self) -> float | None:
        """Sample grid (samples/step_N.png and samples/latest.png) and mean validation PSNR; rank 0 only."""
        if not self.val_pairs:
            return None
        model = self.ema.module if self.ema is not None else self.g
        rows, scores = [], []
        for lr, hr in self.val_pairs:
            sr = model(lr[None].to(self.device)).float().clamp(0, 1)
            rows.append((lr, sr[0].cpu(), hr, *self._realness(sr, hr[None].to(self.device))))
            scores.append(psnr_y(rows[-1][1], hr, crop_border=self.args.scale))
        folder = self.out / "samples"
        save_sample_grid(rows, folder / f"step_{self.step:08d}.png", step=self.step, scale=self.args.scale,
                         psnrs=scores, random_weights=self.random_weights)  # fmt: skip
        latest = (folder / f"step_{self.step:08d}.png").read_bytes()
        ckpt.atomic_write(folder / "latest.png", lambda handle: handle.write(latest))
        return sum(scores) / len(scores)


# --------------------------------------------------------------------------------------- logging


class CsvLog:
    """log.csv with fixed columns; on resume, rows after the checkpoint's step are dropped."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline="") as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= resume_step]
        ckpt.atomic_write_csv(path, rows, LOG_COLUMNS)

    def append(self, row: dict[str, Any]) -> None:
        with open(self.path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=LOG_COLUMNS, extrasaction="ignore", lineterminator="\n")
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Run (or resume) training; returns a summary (rank 0's view)."""
    check_args(args)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark)  # fmt: skip
    torch.backends.cudnn.benchmark = torch.cuda.is_available() and not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    started = time.time()
    info = lock = None
    try:
        info = sr_dist.init_distributed(args.device)
        lock, resume = open_run_folder(args, info)  # before anything is written into --out
        if args.preset == "demo" and not args.hr_dir:
            train_dir, val_dir = sr_data.export_demo_photos(Path(args.out) / "data")
            args.hr_dir, args.val_dir = str(train_dir), args.val_dir or str(val_dir)
        return _run(Trainer(args, info, resume), started)
    finally:
        if lock is not None:
            lock.release()
        if info is not None:
            sr_dist.shutdown(info)
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]


def _save_after_error(trainer: Trainer, err: BaseException, last_saved: int) -> None:
    """On an error between steps, save what the steps since the last checkpoint did (then the caller re-raises)."""
    step = trainer.step
    if step == 0 or step == last_saved or isinstance(err, ckpt.CheckpointError):
        return  # nothing new to save, or the save is what failed
    where = f"Error after step {step} ({type(err).__name__})"
    if trainer.committing:
        print(f"{where} during the optimiser steps: the state is half updated and is not saved. The newest "
              "checkpoint is the one to --resume from.", file=sys.stderr, flush=True)  # fmt: skip
        return
    if trainer.info.distributed:
        print(f"{where} in process {trainer.info.rank}: a checkpoint needs every process, so none is saved; "
              "--resume continues from the newest one.", file=sys.stderr, flush=True)  # fmt: skip
        return
    print(f"{where}: saving a checkpoint of step {step} before exiting.", file=sys.stderr, flush=True)
    try:
        path = trainer.save_checkpoint()
    except Exception as save_err:  # report, but let the original error through
        print(f"  ... that save failed too ({type(save_err).__name__}: {save_err}).", file=sys.stderr, flush=True)
        return
    print(f"  saved {path}; fix the problem, then add --resume to the same command.", file=sys.stderr, flush=True)


def _run(trainer: Trainer, started: float) -> dict[str, Any]:
    args, info, out = trainer.args, trainer.info, trainer.out
    main = info.is_main
    if main:
        _print_header(trainer)
        config = json.dumps(vars(args), indent=2, default=str) + "\n"
        ckpt.atomic_write(out / "config.json", lambda handle: handle.write(config.encode()))
    log = CsvLog(out / "log.csv", trainer.step if trainer.resumed_from else None) if main else None
    plot = lambda: plot_losses(out / "log.csv", out / "loss_curves.png", psnr_steps=args.psnr_steps)  # noqa: E731
    stop_at = args.total_steps if args.run_steps is None else min(args.total_steps, trainer.step + args.run_steps)
    logged: dict[str, list[float]] = {}
    last_logs: dict[str, float] = {}
    tick, tick_step, interrupted = time.time(), trainer.step, None
    last_saved = trainer.step if trainer.resumed_from else -1
    bar = tqdm(total=args.total_steps, initial=trainer.step, disable=not main or args.no_progress, unit="step",
               dynamic_ncols=True, mininterval=1.0, file=sys.stderr)  # fmt: skip
    with StopFlag() as stop:  # until the end: a SIGTERM during the final save or the export is noted, not fatal
        try:
            batches = iter(trainer.loader)
            while trainer.step < stop_at:
                for key, value in trainer.train_step(*next(batches)).items():
                    logged.setdefault(key, []).append(value)
                step = trainer.step
                bar.update(1)
                signalled = torch.tensor([float(stop.signum is not None)])
                if sr_dist.all_reduce(signalled, info, "max").item():  # every rank stops after the same step
                    interrupted = stop.signum or signal.SIGTERM
                sample_now = (args.sample_every > 0 and step % args.sample_every == 0) or step == stop_at or interrupted
                if step % args.log_every == 0 or sample_now:
                    means = torch.tensor([sum(v) / len(v) for v in logged.values()], dtype=torch.float64)
                    last_logs = dict(zip(logged, sr_dist.all_reduce(means, info).tolist()))
                    elapsed = (time.time() - tick) / max(1, step - tick_step)
                    row = {"step": step, "phase": "gan" if step > args.psnr_steps else "psnr",
                           "lr_g": trainer.opt_g.param_groups[0]["lr"], **last_logs, "sec_per_step": elapsed,
                           "img_per_sec": args.batch_size * info.world_size / elapsed}  # fmt: skip
                    if main:
                        row["val_psnr"] = trainer.write_samples() if sample_now else None
                        log.append(row)
                        plot() if sample_now else None
                        shown = {k: f"{v:.3g}" for k, v in last_logs.items() if k in ("l_pix", "l_g_total", "l_d")}
                        bar.set_postfix(shown | {"img/s": f"{row['img_per_sec']:.1f}"})
                    logged, tick, tick_step = {}, time.time(), step
                if step % args.checkpoint_every == 0:
                    trainer.save_checkpoint()
                    last_saved = step
                if interrupted is not None:
                    break
            bar.close()
            final_ckpt = trainer.ckpt_dir / ckpt.checkpoint_name(trainer.step) if main else None
            if trainer.step != last_saved:
                final_ckpt, last_saved = trainer.save_checkpoint(), trainer.step
        except Exception as err:  # a second Ctrl-C (KeyboardInterrupt) stops at once, without a save
            bar.close()
            _save_after_error(trainer, err, last_saved)
            raise
        summary: dict[str, Any] = {"step": trainer.step, "checkpoint": final_ckpt, "interrupted": interrupted,
                                   "losses": last_logs, "seconds": time.time() - started, "out": out,
                                   "random_weights": trainer.random_weights}  # fmt: skip
        if main:
            finished = trainer.step >= args.total_steps
            if finished:
                summary["generator"] = trainer.export_generator()
            if trainer.val_pairs and not (out / "samples" / f"step_{trainer.step:08d}.png").exists():
                trainer.write_samples()
            plot()
            _print_summary(trainer, summary, finished)
    return summary


def _print_header(trainer: Trainer) -> None:
    args, info = trainer.args, trainer.info
    params = [sum(p.numel() for p in model.parameters()) / 1e6 for model in (trainer.g, trainer.d)]
    origin = f"resumed from {trainer.resumed_from} at step {trainer.step}" if trainer.resumed_from else "new run"
    losses = f"{args.pixel_weight} L1 + {args.perceptual_weight} VGG19 + {args.gan_weight} {args.gan_loss} GAN"
    losses += f" (L1 only for the first {args.psnr_steps} steps)" if args.psnr_steps else ""
    print(f"[retrofit_esrgan] {origin}; {info.world_size} process(es) on {trainer.device.type}\n"
          f"  data: {len(trainer.dataset)} HR image(s) from {args.hr_dir}, {args.patch_size} px patches, "
          f"batch {args.batch_size}/process, LR MATLAB bicubic x{args.scale}\n"
          f"  G: RRDBNet {params[0]:.2f}M params | D: {args.discriminator} {params[1]:.2f}M params | losses: {losses}\n"
          f"  out: {trainer.out}", file=sys.stderr, flush=True)  # fmt: skip


def _print_summary(trainer: Trainer, summary: dict[str, Any], finished: bool) -> None:
    out = trainer.out
    minutes, seconds = divmod(int(round(summary["seconds"])), 60)
    state = "finished" if finished else "stopped"
    if summary["interrupted"]:
        state = f"interrupted ({signal.Signals(summary['interrupted']).name})"
    lines = [
        f"Training {state} at step {summary['step']}/{trainer.args.total_steps} after {minutes}m{seconds:02d}s.",
        f"  last losses : {', '.join(f'{k} {v:.4g}' for k, v in sorted(summary['losses'].items()))}",
        f"  checkpoint  : {summary['checkpoint']}",
        f"  samples     : {out / 'samples' / 'latest.png'}   (LR bicubic | SR | HR)",
        f"  loss curves : {out / 'loss_curves.png'}   (from {out / 'log.csv'})",
    ]
    if finished:
        evaluate = os.path.relpath(Path(__file__).resolve().with_name("evaluate.py"))  # works from any folder
        lines.append(f"  generator   : {'  and  '.join(map(str, summary['generator']))}")
        lines.append(f"  evaluate    : python {evaluate} --model {summary['checkpoint']} "
                     f"--hr-dir {trainer.args.val_dir or 'Set5/HR'}")  # fmt: skip
    else:
        lines.append(f"  continue    : add --resume to the same command (--out {out})")
    print("\n".join(lines), flush=True)
    if trainer.random_weights:
        models.banner([f"This run used RANDOM weights for: {', '.join(trainer.random_weights)}.",
                       "Its samples and losses show that the pipeline runs, not what SeD achieves."],
                      stream=sys.stdout)  # fmt: skip


# -------------------------------------------------------------------------------------------- main


def _user_message(err: BaseException) -> str:
    """The message of ``err``; for an error raised in a DataLoader worker, its own message without the traceback."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 2 usage/data error, 128+N after signal N)."""
    args = parse_args(argv)
    try:
        summary = train(args)
    except (UsageError, sr_data.DataError, models.WeightsUnavailable, ckpt.CheckpointError, ckpt.RunFolderBusy) as err:
        print(f"error: {_user_message(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in ckpt.DISK_FULL_ERRNOS:
            raise
        print(f"error: the disk holding --out {args.out!r} is full ({err}); free some space, then add --resume.",
              file=sys.stderr)  # fmt: skip
        return 2
    return 128 + summary["interrupted"] if summary["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
