"""`run_training`: the `dpseg train` command on top of the building blocks in
dpseg.train.loop: a run folder with a lock, checkpoints, resume that keeps the privacy
ledger, evaluation and the report."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import dpseg
from dpseg.data import DataError, MSDDataset, Preprocessing
from dpseg.privacy.secret import (
    keyed_seed,
    new_secret,
    resumed_secret,
    run_secret,
    without_noise_seed,
)
from dpseg.train.checkpoint import load_checkpoint, save_checkpoint, set_rng_state
from dpseg.train.config import TrainConfig, resolve_normalize
from dpseg.train.init_weights import apply_init, read_init
from dpseg.train.loop import (
    build_model,
    build_optimizer,
    device_name,
    evaluate,
    load_cases,
    local_train,
    lr_at,
    make_loader,
    noise_for_epsilon,
    privatize,
    split_cases,
    total_steps,
    unwrap,
)
from dpseg.train.losses import DiceCELoss


# --- the run -----------------------------------------------------------------------------
def _check_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".dpseg_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise DataError(
            f"{out}: the run folder cannot be written ({exc.strerror or exc}). Choose a "
            "writable --out folder."
        ) from exc


class _RunLock:
    """RUN/.lock holding the pid of the run writing there, so two runs never interleave
    their checkpoints; a lock whose process is gone (a killed run) is taken over."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self):
        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        if pid and pid != os.getpid() and _alive(pid):
            raise DataError(
                f"{self.path.parent}: another dpseg run (pid {pid}) is writing to this folder. "
                "Wait for it to finish, or choose another --out."
            )
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _case_indices(dataset: MSDDataset, site: str | None) -> list[int]:
    if site is None:
        return list(range(len(dataset)))
    by_site = dataset.indices_by_site()
    if site not in by_site:
        raise DataError(
            f"{dataset.json_path}: no case of site {site!r} (sites: {sorted(by_site)}). "
            "Choose one of them with --site or leave --site out."
        )
    return by_site[site]


def _listed(dataset: MSDDataset, indices: list[int], spec: str) -> list[int]:
    from dpseg.train.splits import read_case_list, select_cases

    listed = set(select_cases([c.name for c in dataset.cases], read_case_list(spec), spec))
    kept = [i for i in indices if i in listed]
    if not kept:
        raise DataError(f"--split {spec}: none of its cases is in this site; check --site.")
    return kept


def run_training(
    cfg: TrainConfig,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """`dpseg train`: train, checkpoint, evaluate and report into cfg.out; returns the report.

    resume=True continues from cfg.out/checkpoint.pt with the settings saved there; only the
    keys in `overrides` that are allowed to change (steps, epochs, device, eval_every,
    checkpoint_every, epsilon_every) are applied on top. Raises DataError / ValueError for
    input the user can fix.
    """
    from dpseg.train import distributed

    out = Path(cfg.out)
    nproc = _nproc(cfg, resume, overrides)
    if nproc > 1 and distributed.world_size() == 1:  # the launcher: start the workers
        if not resume:
            cfg.check()  # here, not in N tracebacks
            if cfg.init:
                read_init(cfg.init, cfg.data, [c.name for c in MSDDataset(cfg.data).cases])
            if (out / "checkpoint.pt").exists():
                raise DataError(
                    f"{out / 'checkpoint.pt'}: this run folder already holds a checkpoint. "
                    "Continue it with --resume, or choose a new --out folder."
                )
        _check_out(out)
        # every worker reads the run's secret from the folder: it must exist before them
        if resume:
            saved = load_checkpoint(out / "checkpoint.pt")["config"]
            resumed_secret(out, saved.get("secret_seed"))
        else:
            new_secret(out, cfg.secret_seed)
        return distributed.launch(cfg, resume, overrides, progress, nproc)
    if distributed.rank() != 0:  # rank 0 holds the lock and writes the run folder
        return _run(cfg, resume, overrides, progress)
    if resume or not (out / "checkpoint.pt").exists():
        _check_out(out)
    with _RunLock(out):
        return _run(cfg, resume, overrides, progress)


def _nproc(cfg: TrainConfig, resume: bool, overrides: dict | None) -> int:
    if overrides and "nproc" in overrides:
        return int(overrides["nproc"])
    if resume:
        return int(load_checkpoint(Path(cfg.out) / "checkpoint.pt")["config"].get("nproc", 1))
    return cfg.nproc


def _run(cfg: TrainConfig, resume: bool, overrides: dict | None, progress: bool) -> dict:
    from dpseg.train.distributed import rank, world_size, wrap_for_ranks
    from dpseg.train.report import write_report

    lead = rank() == 0  # the process that evaluates and writes (every process trains)

    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(ckpt["config"])
        saved.out = str(out)
        if "normalize" not in ckpt["config"]:  # saved before the setting: it used the window
            saved.normalize = "window"
        for key, value in (overrides or {}).items():
            setattr(saved, key, value)
        if overrides and ("steps" in overrides) != ("epochs" in overrides):
            if "steps" in overrides:
                saved.epochs = None
            else:
                saved.steps = None
        cfg = saved
    elif ckpt_path.exists() and lead:
        raise DataError(
            f"{ckpt_path}: this run folder already holds a checkpoint. Continue it with "
            "--resume, or choose a new --out folder; nothing was changed."
        )
    cfg.check()
    if cfg.threads and world_size() == 1:  # (each worker of --nproc sets its own)
        torch.set_num_threads(cfg.threads)
    if lead:
        _check_out(out)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu"
        )
    device = torch.device(cfg.device)
    if device.type == "cuda" and world_size() > 1:
        device = torch.device("cuda", torch.cuda.current_device())

    dataset = MSDDataset(cfg.data, channel=cfg.channel)
    indices = _case_indices(dataset, cfg.site)
    if cfg.split:  # only the listed cases are ever loaded; validation is drawn from them
        indices = _listed(dataset, indices, cfg.split)
    train_idx, val_idx = split_cases(indices, cfg.val_fraction, cfg.seed)
    names = [c.name for c in dataset.cases]
    init, init_weights = None, None
    if ckpt is None and cfg.init:  # before any case is loaded: refused weights cost nothing
        init_weights = read_init(cfg.init, cfg.data, names)
    split = {"train": [names[i] for i in train_idx], "val": [names[i] for i in val_idx]}
    if ckpt is not None and ckpt.get("split") != split:
        raise DataError(
            f"{cfg.data}: the cases differ from those the checkpoint {ckpt_path} was trained on "
            "(a changed dataset.json?). Resume with the same --data, or start a new run."
        )
    prep = Preprocessing(
        normalize=resolve_normalize(cfg.normalize, dataset.modality), target_spacing=cfg.spacing
    )
    num_classes = dataset.num_classes
    tr_images, tr_labels, _ = load_cases(dataset, prep, train_idx, progress)
    va_images, va_labels, va_volumes = load_cases(dataset, prep, val_idx, progress and lead)
    if not lead:  # only rank 0 evaluates
        va_images, va_labels, va_volumes = [], [], []

    model = build_model(cfg, num_classes)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        init = ckpt.get("init")
    elif init_weights is not None:
        init = apply_init(model, *init_weights)
    model.to(device)
    optimizer = build_optimizer(cfg, model.parameters())
    model = wrap_for_ranks(model, device)
    loader = make_loader(tr_images, tr_labels, cfg)
    steps = total_steps(cfg, loader)
    sigma = ckpt["privacy"]["noise_multiplier"] if ckpt is not None and cfg.dp else None
    if ckpt is not None:
        secret = resumed_secret(out, cfg.secret_seed)
    elif world_size() == 1:
        secret = new_secret(out, cfg.secret_seed)
    else:  # the launcher drew it for every rank
        secret = run_secret(out, cfg.secret_seed, create=False)
    rng_seed = keyed_seed(cfg.seed, secret)  # keys the Poisson draws and the noise
    model, optimizer, loader, privacy = privatize(
        cfg, model, optimizer, loader, steps, sigma, rng_seed=rng_seed
    )
    history: dict[str, list] = {"loss": [], "batch": [], "epsilon": [], "dice": []}
    start, seconds = 0, 0.0
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        if cfg.dp:
            privacy.load_ledger(ckpt["privacy"]["ledger"])
        set_rng_state(ckpt["rng"])
        history, start, seconds = ckpt["history"], int(ckpt["step"]), float(ckpt["seconds"])
        if start >= steps:
            warnings.warn(
                f"the checkpoint is at step {start} >= {steps}; nothing to train", stacklevel=2
            )
    if cfg.dp and cfg.target_epsilon is not None and privacy.sample_rate:
        planned = noise_for_epsilon(cfg, privacy.sample_rate, steps) if ckpt is not None else None
        if planned is not None and planned > privacy.noise_multiplier * 1.001:
            privacy.notes.append(
                "resumed past the planned steps: epsilon will exceed the target "
                f"{cfg.target_epsilon}"
            )

    loss_fn = DiceCELoss()
    val_names = split["val"]
    spacings = [v.spacing for v in va_volumes]

    def validate(step: int, final: bool = False) -> list[dict]:
        # The plain model (under no_grad the capture is bypassed): no DDP collective on a
        # forward that rank 0 alone runs.
        rows = evaluate(
            unwrap(model), va_images, va_labels, cfg, num_classes, spacings, val_names, device,
            hd95=final,
        )  # fmt: skip
        if rows:
            history["dice"].append([step, float(np.mean([r["dice"] for r in rows]))])
        return rows

    def checkpoint(step: int) -> None:
        if not lead:
            return
        save_checkpoint(
            ckpt_path,
            {
                "config": cfg.as_dict(),
                "model": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
                "model_args": {
                    "spatial_dims": cfg.spatial_dims,
                    "in_channels": 1,
                    "out_channels": num_classes,
                    "channels": list(cfg.channels),
                    "norm": cfg.norm,
                    "upsample": cfg.upsample,
                },  # fmt: skip
                "preprocessing": {
                    "normalize": prep.normalize,
                    "window": list(prep.window),
                    "percentiles": list(prep.percentiles),
                    "target_spacing": list(cfg.spacing) if cfg.spacing else None,
                },  # fmt: skip
                "optimizer": without_noise_seed(optimizer.state_dict()),
                "privacy": {
                    "noise_multiplier": privacy.noise_multiplier,
                    "sample_rate": privacy.sample_rate,
                    "ledger": privacy.ledger(),
                },
                "split": split,
                "init": init,
                "step": step,
                "seconds": seconds,
                "history": history,
            },
        )

    eps = privacy.epsilon(cfg.delta) if cfg.dp else None
    bar = tqdm(
        total=steps, initial=min(start, steps), desc="training", unit="step",
        disable=None if (progress and lead) else True,  # None: off when not a terminal
    )  # fmt: skip
    step = start
    t0 = time.perf_counter()
    session_seconds = 0.0  # training only, this session

    def on_step(s: int, loss: float, batch: int) -> None:
        nonlocal eps, step
        step = s
        history["loss"].append(loss)
        history["batch"].append(batch)
        if cfg.dp and (s % max(1, cfg.epsilon_every) == 0 or s == steps):
            eps = privacy.epsilon(cfg.delta)
            history["epsilon"].append([s, eps])
        post = {"loss": f"{loss:.3f}"}
        if eps is not None:
            post["eps"] = f"{eps:.2f}"
        if history["dice"]:
            post["dice"] = f"{history['dice'][-1][1]:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.update()

    # Train in chunks that end at the next evaluation or checkpoint.
    marks = {steps}
    for every in (cfg.eval_every, cfg.checkpoint_every):
        if every and every > 0:
            marks.update(range(every, steps, every))
    try:
        for mark in sorted(m for m in marks if m > start):
            t = time.perf_counter()
            local_train(
                model,
                optimizer,
                loader,
                loss_fn,
                mark - step,
                device,
                on_step,
                rng_seed,
                step,
                lr=lambda k: lr_at(cfg, k, steps),
            )
            seconds += time.perf_counter() - t
            session_seconds += time.perf_counter() - t
            if cfg.eval_every and mark % cfg.eval_every == 0 and mark != steps and va_images:
                validate(mark)
            if mark == steps or (cfg.checkpoint_every and mark % cfg.checkpoint_every == 0):
                checkpoint(mark)
    finally:
        bar.close()
    rows = validate(step, final=True) if va_images else []
    if rows:
        checkpoint(step)  # again, with the final Dice in its history
    wall = time.perf_counter() - t0
    trained = _global_sum(sum(history["batch"][len(history["batch"]) - (step - start) :]))
    if not lead:
        return {}
    overlays = _overlays(out, unwrap(model), va_images, va_labels, rows, cfg, dataset, device)
    report = {
        "dice": float(np.mean([r["dice"] for r in rows])) if rows else None,
        "dice_largest_component": (
            float(np.mean([r["largest_component"]["dice"] for r in rows])) if rows else None
        ),
        "epsilon": privacy.epsilon(cfg.delta) if cfg.dp else None,
        "delta": cfg.delta if cfg.dp else None,
        "steps": step,
        "seconds": seconds,
        "minutes": seconds / 60.0,
        "wall_seconds_this_session": wall,
        "nproc": world_size(),
        "threads_per_process": torch.get_num_threads(),
        "samples_per_second": trained / session_seconds if session_seconds > 0 else None,
        "device": device_name(device),
        "dp": cfg.dp,
        "engine": cfg.engine if cfg.dp else "none",
        "noise_multiplier": privacy.noise_multiplier,
        "max_grad_norm": cfg.max_grad_norm if cfg.dp else None,
        "sample_rate": privacy.sample_rate,
        # The normaliser: declared with --sample-rate, else q times the training cases.
        "expected_batch": (
            float(cfg.batch)
            if cfg.sample_rate is not None
            else privacy.sample_rate * len(train_idx)
        ),
        "items_per_patient": cfg.items_per_patient,
        "accountant": (privacy.ledger() or {}).get("accountant") if cfg.dp else None,
        **privacy.guarantee(),
        "grad_sample_mode": privacy.grad_sample_mode,
        "notes": privacy.notes,
        "train_cases": len(train_idx),
        "val_cases": len(val_idx),
        "num_classes": num_classes,
        "parameters": sum(p.numel() for p in unwrap(model).parameters()),
        "resumed_from_step": start if ckpt is not None else None,
        "init": init,
        "per_case": rows,
        "overlays": overlays,
        "config": cfg.as_dict(),
        "versions": {"dpseg": dpseg.__version__, "torch": torch.__version__},
        "history": history,
    }
    write_report(out, report)
    return report


def _overlays(out, model, images, labels, rows, cfg, dataset, device) -> str | None:
    from dpseg.train.overlay import validation_overlays

    name = f"DP ({cfg.engine})" if cfg.dp else "non-private"
    return validation_overlays(
        out / "overlays.png", model, images, labels, rows, cfg, dataset.labels, name, device=device
    )


def _global_sum(value: int) -> int:
    """Summed over the processes training together (the samples of every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return int(t.item())
