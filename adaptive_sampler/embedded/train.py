"""Reproducible CPU training of the embedded UNet and classifier (``python -m adaptive_sampler train-model``)."""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from tqdm.auto import trange

from . import NULL_LABEL, WEIGHTS_DIR, sd_alphas_cumprod
from .classifier import DigitsClassifier
from .data import load_digits_dataset
from .unet import DigitsUNet

LR, WEIGHT_DECAY, EMA_DECAY, MAX_SHIFT = 2e-3, 1e-4, 0.999, 1
#: What each UNet learns (``train_model(objective=...)``).
OBJECTIVES = {"eps": "eps-prediction, SD 1.x discrete schedule",
              "flow": "rectified flow: velocity, logit-normal sigma, timestep = sigma * 1000"}


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = MAX_SHIFT) -> torch.Tensor:
    """Random translations by up to ``max_shift`` pixels (background is -1)."""
    dx, dy = torch.randint(-max_shift, max_shift + 1, (2,), generator=g).tolist()
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train_model(out_path: Path, seed: int = 0, iterations: int = 10000, batch_size: int = 128,
                label_dropout: float = 0.15, progress: bool = True, objective: str = "eps") -> dict:
    """Label dropout for CFG, EMA weights saved. ``objective`` ``"eps"``: eps-prediction on Stable Diffusion's
    discrete schedule (the digits model); ``"flow"``: rectified flow, velocity ``noise - x0`` at
    ``x = (1 - sigma) * x0 + sigma * noise`` with a logit-normal sigma (SD3's training distribution) and the network
    fed ``sigma * 1000`` as its timestep (the flow digits model).

    It sees all digits: the held-out split exists for the classifier's accuracy check. Data order, noise, timesteps
    and label dropout all come from one seeded generator, so a run is reproducible on the same machine and thread
    count. ``initial_loss`` and ``final_loss`` average the first and last quarter of the
    iterations (at most 500 each)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = load_digits_dataset("all")
    alphas = sd_alphas_cumprod()
    model = DigitsUNet()
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    # OneCycleLR needs a warm-up of at least one step: runs shorter than 40 iterations (smoke tests) follow the
    # beginning of a 40-iteration schedule.
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=max(iterations, 40), pct_start=0.05)
    start, losses = time.time(), []
    for it in trange(iterations, desc="train UNet", disable=not progress):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x0 = _shift(images[idx], g)
        y = labels[idx].clone()
        y[torch.rand(batch_size, generator=g) < label_dropout] = NULL_LABEL
        if objective == "eps":
            t = torch.randint(0, 1000, (batch_size,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            a = alphas[t][:, None, None, None]
            xt, timestep, target = a.sqrt() * x0 + (1 - a).sqrt() * noise, t.float(), noise
        else:
            sigma = torch.sigmoid(torch.randn(batch_size, generator=g))
            noise = torch.randn(x0.shape, generator=g)
            s = sigma[:, None, None, None]
            xt, timestep, target = (1 - s) * x0 + s * noise, sigma * 1000, noise - x0
        loss = torch.nn.functional.mse_loss(model(xt, timestep, y), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        decay = min(EMA_DECAY, (1 + it) / (10 + it))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        losses.append(loss.item())
    save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(out_path))
    window = min(500, max(1, iterations // 4))
    return {"objective": OBJECTIVES[objective], "iterations": iterations, "batch_size": batch_size, "label_dropout": label_dropout, "seed": seed,
            "optimizer": f"AdamW, one-cycle lr (max {LR:g}, 5% warm-up), weight decay {WEIGHT_DECAY:g}",
            "ema_decay": EMA_DECAY, "augmentation": f"one random shift of up to {MAX_SHIFT} pixel per batch",
            "initial_loss": sum(losses[:window]) / window, "final_loss": sum(losses[-window:]) / window,
            "seconds": round(time.time() - start, 1), "parameters": sum(p.numel() for p in model.parameters())}


def train_classifier(out_path: Path, seed: int = 0, epochs: int = 40, progress: bool = True) -> dict:
    """Cross-entropy on the train split only, with shifts and light pixel noise so that slightly imperfect samples
    are still read by their shape; the held-out accuracy is measured on the test split."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    x, y = load_digits_dataset("train")
    xt, yt = load_digits_dataset("test")
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    start = time.time()
    for _ in trange(epochs, desc="train classifier", disable=not progress):
        perm = torch.randperm(x.shape[0], generator=g)
        for k in range(0, x.shape[0], 64):
            idx = perm[k:k + 64]
            xb = _shift(x[idx], g) + 0.05 * torch.randn(x[idx].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    save_file(model.state_dict(), str(out_path))
    return {"epochs": epochs, "seed": seed, "held_out_accuracy": acc, "seconds": round(time.time() - start, 1)}


def save_reference_statistics(classifier_path: Path, out_path: Path) -> None:
    """Feature mean and covariance of all real digits, so the Fréchet distance needs no dataset at run time."""
    from safetensors.torch import load_file

    from ..lab.metrics import feature_statistics

    classifier = DigitsClassifier()
    classifier.load_state_dict(load_file(str(classifier_path)))
    mu, cov = feature_statistics(load_digits_dataset("all")[0], classifier.eval())
    save_file({"mu": torch.from_numpy(mu), "cov": torch.from_numpy(cov)}, str(out_path))


#: What ``train-model`` can retrain: name -> (model card key, weights file).
PARTS = {"digits": ("unet", "unet.safetensors"), "flow": ("flow_unet", "flow_unet.safetensors"),
         "classifier": ("classifier", "classifier.safetensors")}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m adaptive_sampler train-model",
        description="Retrain the embedded models with a fixed seed on 2 CPU threads: the digits UNet (eps, SD's "
                    "schedule; about 10 minutes on 2 cores), the flow UNet (rectified flow; about 10 minutes) and the "
                    "classifier (under a minute). Writes the weights and model_card.json to --out (default: the "
                    "package's weights folder). Needs scikit-learn for the data.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR, help="output folder (default: the package data)")
    parser.add_argument("--only", choices=list(PARTS), nargs="+", default=list(PARTS),
                        help="retrain only these (default: all); the model card keeps the other entries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=10000)
    parser.add_argument("--classifier-epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads; the weights are bit-reproducible only with the same count (default: 2)")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.classifier_epochs < 1 or args.threads < 1:
        parser.error("--iterations, --classifier-epochs and --threads must be positive")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    card_path = args.out / "model_card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card.update({"torch": torch.__version__, "threads": args.threads})
    for part in args.only:
        key, weights = PARTS[part]
        if part == "classifier":
            card[key] = train_classifier(args.out / weights, args.seed, args.classifier_epochs)
            save_reference_statistics(args.out / weights, args.out / "digits_reference.safetensors")
        else:
            card[key] = train_model(args.out / weights, args.seed, args.iterations,
                                    objective="eps" if part == "digits" else "flow")
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))
    return 0
