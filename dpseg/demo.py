"""`dpseg demo`: DP training of a small 3D U-Net on generated CT phantoms, start to finish
in about two minutes on a 2-core CPU, with the DP step's cost beside a non-private step."""

from __future__ import annotations

import time

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import dpseg
from dpseg.data import PatchDataset, make_phantom, site_params, window
from dpseg.models import UNet
from dpseg.perf import StepBenchConfig, make_step, time_call
from dpseg.train.inference import sliding_window_inference
from dpseg.train.losses import DiceCELoss
from dpseg.train.metrics import dice_per_class


def _phantoms(cases: int, size: int, sites: int, seed: int):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for i in range(cases):
        hu, mask = make_phantom(size, rng, site_params(seed, i % sites))
        images.append(window(hu))
        labels.append(mask)
    return images, labels


def run_demo(
    cases: int = 24,
    size: int = 48,
    patch: int = 32,
    batch: int = 4,
    steps: int = 40,
    noise_multiplier: float = 1.0,
    max_grad_norm: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)
    print(f"Generating {cases + 4} CT phantoms ({size}^3, 3 scanner sites) ...")
    images, labels = _phantoms(cases + 4, size, 3, seed)
    train = PatchDataset(images[:cases], labels[:cases], (patch,) * 3, p_foreground=0.5, seed=seed)
    model = UNet(3, 1, 2, channels=(8, 16, 32), norm="group")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    engine = dpseg.PrivacyEngine(accountant="prv")
    loss_fn = DiceCELoss()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(train, batch_size=batch),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_seed=seed,
        # Constants of the demo's settings, not read off the data: add/remove adjacency.
        sample_rate=min(1.0, batch / cases),
        expected_batch_size=batch,
        criterion=loss_fn,
    )
    print(
        f"DP-SGD: sigma={noise_multiplier}, C={max_grad_norm}, Poisson q={engine.sample_rate:.3f} "
        f"over {cases} patients (one patch per patient per batch)"
    )
    losses, done, start = [], 0, time.perf_counter()
    with tqdm(total=steps, desc="training", unit="step") as bar:
        while done < steps:
            for x, y in loader:
                optimizer.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                done += 1
                bar.update()
                bar.set_postfix(loss=f"{losses[-1]:.3f}", eps=f"{engine.get_epsilon(delta):.2f}")
                if done == steps:
                    break
    train_s = time.perf_counter() - start
    epsilon = engine.get_epsilon(delta)

    plain = model.release().eval()
    dices = []
    for image, label in zip(images[cases:], labels[cases:], strict=True):
        logits = sliding_window_inference(
            torch.from_numpy(image)[None], plain, (patch,) * 3, overlap=0.25
        )
        dices.append(float(dice_per_class(logits.argmax(0).numpy(), label, 2)[0]))

    print("Timing one training step (same model and batch, median of 5) ...")
    cfg = StepBenchConfig(channels=(8, 16, 32), size=patch, batch=batch)
    x = torch.randn(batch, 1, patch, patch, patch)
    y = torch.randint(0, 2, (batch, patch, patch, patch))
    base = UNet(3, 1, 2, channels=(8, 16, 32), norm="group")
    times = {
        e: time_call(make_step(e, base, x, y, cfg), repeats=5).median_s for e in ("none", "dpseg")
    }
    summary = {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-5:])),
        "epsilon": epsilon,
        "delta": delta,
        "held_out_dice": float(np.mean(dices)),
        "train_seconds": train_s,
        "step_ms": {k: v * 1e3 for k, v in times.items()},
        "dp_step_ratio": times["dpseg"] / times["none"],
    }
    print()
    print(
        f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
        f"over {steps} DP steps ({train_s:.0f} s)"
    )
    print(f"privacy spent: epsilon = {epsilon:.2f} at delta = {delta:g} (PRV accountant)")
    print(
        f"held-out liver Dice after {steps} steps: {summary['held_out_dice']:.3f} "
        "(a short demo run)"
    )
    print(
        f"step time: non-private {times['none'] * 1e3:.0f} ms, dpseg {times['dpseg'] * 1e3:.0f} ms "
        f"-> DP costs {summary['dp_step_ratio']:.2f}x"
    )
    return summary
