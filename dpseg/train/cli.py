"""`dpseg train`, `dpseg predict` and `dpseg phantoms`: argparse front ends.

Options that a resumed run takes from its checkpoint default to None here, so that
`--resume` can tell an option the user gave (and refuse one that contradicts the
checkpoint) from one left out. Data and value errors from below become `UsageError`: one
paragraph naming the file, exit code 2, no traceback.
"""

from __future__ import annotations

from pathlib import Path

from dpseg.cli_types import UsageError, add_freed_memory_option, csv_list
from dpseg.train.config import LR_SCHEDULES, NORMALIZE

__all__ = ["add_train_parser", "add_predict_parser", "add_phantoms_parser"]

# Options a resumed run may change; every other one is fixed by the checkpoint.
RESUMABLE = (
    "steps", "epochs", "device", "eval_every", "checkpoint_every", "epsilon_every", "nproc",
    "threads",
)  # fmt: skip


def _usage_errors(fn):
    """Turns the data layer's DataError and ValueError into the CLI's UsageError."""

    def run(args) -> int:
        from dpseg.data import DataError

        try:
            return fn(args)
        except (DataError, ValueError, FloatingPointError) as exc:
            raise UsageError(" ".join(str(exc).split())) from None

    return run


# --- train ---------------------------------------------------------------------------------
def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a U-Net on an MSD-layout dataset, with DP-SGD (default) or without",
        description=(
            "Trains a segmentation U-Net on one site's cases with differentially private SGD "
            "(per-patient clipping, Gaussian noise, Poisson sampling over patients) and writes "
            "RUN/checkpoint.pt (periodically and at the end), report.json, report.md and "
            "loss/Dice/epsilon curves. --resume continues RUN with its privacy ledger intact."
        ),
    )
    p.add_argument("--data", type=Path, help="MSD folder (dataset.json, imagesTr/, labelsTr/)")
    p.add_argument("--out", type=Path, help="run folder (required)")
    length = p.add_mutually_exclusive_group()
    length.add_argument(
        "--steps", type=int, default=None, help="total optimizer steps (default 200)"
    )
    length.add_argument(
        "--epochs", type=float, default=None, help="passes over the patients (1/q steps each)"
    )
    p.add_argument("--patch", type=int, default=None, help="patch edge in voxels (default 32)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="expected batch size, patients: the normaliser (default 8)",
    )
    p.add_argument(
        "--sample-rate",
        type=float,
        default=None,
        help="Poisson rate q per patient and step, a public constant: with it nothing the run "
        "releases depends on the number of cases and epsilon is for add/remove adjacency. "
        "Without it q = 1 / ceil(cases / batch) reads the number of cases, which is then "
        "public, and epsilon is for replace-one adjacency (about twice as large)",
    )
    p.add_argument(
        "--items-per-patient",
        type=int,
        default=None,
        help="patches (2-D: slices) each sampled patient brings, averaged before clipping "
        "so the patient still moves the update by at most C (default 1)",
    )
    p.add_argument(
        "--privacy-unit",
        default=None,
        metavar="NAME",
        help="what the ledger and every report call the unit of privacy, each MSD case "
        "(default patient): say 'case' when a subject may have several cases, as in the "
        "Decathlon's hippocampus (one crop per hemisphere). A name only: the units are the "
        "cases either way; resuming under another name is refused",
    )
    privacy = p.add_mutually_exclusive_group()
    privacy.add_argument(
        "--no-dp", dest="dp", action="store_false", default=None, help="train without DP"
    )
    privacy.add_argument("--noise-multiplier", type=float, default=None, help="sigma (default 1.0)")
    privacy.add_argument(
        "--target-epsilon", type=float, default=None, help="solve sigma for this epsilon"
    )
    p.add_argument(
        "--max-grad-norm", type=float, default=None, help="per-patient clip bound C (default 1.0)"
    )
    p.add_argument("--delta", type=float, default=None, help="delta (default 1e-5)")
    p.add_argument("--engine", choices=["dpseg", "opacus"], default=None)
    p.add_argument("--accountant", choices=["prv", "rdp"], default=None)
    p.add_argument("--backend", default=None, help="dpseg fused-op backend (default auto)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None)
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="processes training this site together through torch.distributed (torchrun; "
        "gloo on cpu, NCCL on cuda, one GPU each); the DP step and Poisson sampling stay "
        "global (default 1)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads per process (default cores/nproc)"
    )
    p.add_argument("--optimizer", choices=["adam", "sgd"], default=None)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None)
    p.add_argument(
        "--channels", type=csv_list(int), default=None, help="U-Net widths (default 8,16,32)"
    )
    p.add_argument("--spatial-dims", type=int, choices=[2, 3], default=None)
    p.add_argument("--norm", choices=["group", "instance"], default=None)
    p.add_argument("--upsample", choices=["transpose", "interp"], default=None)
    p.add_argument("--channel", type=int, default=None, help="channel of 4-D images")
    p.add_argument("--site", default=None, help="train on this site's cases only")
    p.add_argument(
        "--split",
        default=None,
        metavar="FILE[:KEY]",
        help="train only on the cases of list KEY (default 'train') of a split file, e.g. "
        "docs/results/hippocampus/split.json; validation cases are drawn from inside that "
        "list and no other case is loaded",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="CKPT",
        help="start the model from these weights (a dpseg checkpoint.pt or a saved "
        "state_dict): public pretraining. Tensors are matched by name and shape; an output "
        "layer for other classes starts fresh. Refused when the weights were trained on any "
        "case of --data: they would publish those patients outside the epsilon",
    )
    p.add_argument(
        "--normalize",
        choices=NORMALIZE,
        default=None,
        help="intensities: auto (default) windows CT to [-200, 300] HU and scales every other "
        "modality (dataset.json) by the volume's own 0.5-99.5 percentiles",
    )
    p.add_argument(
        "--spacing", type=csv_list(float), default=None, help="resample to mm, e.g. 3,3,3"
    )
    p.add_argument("--val-fraction", type=float, default=None, help="held-out share (default 0.2)")
    p.add_argument("--p-foreground", type=float, default=None, help="foreground patch share (0.5)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument(
        "--secret-seed",
        type=int,
        default=None,
        help="fix the secret that keys the Poisson draws and the noise (default: fresh OS "
        "entropy, kept in RUN/secret.key): for tests and reproductions only, since whoever "
        "knows it can replay both",
    )
    p.add_argument(
        "--eval-every", type=int, default=None, help="validate every N steps (0: at the end)"
    )
    p.add_argument("--checkpoint-every", type=int, default=None, help="default 50")
    p.add_argument("--epsilon-every", type=int, default=None, help="epsilon curve resolution (10)")
    p.add_argument("--resume", action="store_true", help="continue RUN/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_freed_memory_option(p)
    p.set_defaults(func=_usage_errors(_run_train))


def _run_train(args) -> int:
    from dpseg.train.config import TrainConfig
    from dpseg.train.run import run_training

    if args.out is None:
        raise UsageError("--out is required: the run folder for checkpoint.pt and the report")
    skip = {"command", "func", "config", "resume", "quiet", "out", "data", "freed_memory"}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if "spacing" in given and len(given["spacing"]) != 3:
        raise UsageError(f"--spacing needs 3 values in mm, e.g. 3,3,3; got {given['spacing']}")
    if args.resume:
        from dpseg.train.checkpoint import load_checkpoint

        saved = load_checkpoint(args.out / "checkpoint.pt")["config"]
        if args.data is not None and Path(args.data).resolve() != Path(saved["data"]).resolve():
            raise UsageError(
                f"--data {args.data} differs from the run's data {saved['data']}; resume with "
                "the same data or leave --data out"
            )
        if "init" in given and given["init"] != saved.get("init"):
            raise UsageError(
                "--init applies to a new run only: --resume continues from the run's own "
                "weights (and its record of where they started). Drop --init, or start a new "
                "--out."
            )
        for key, value in given.items():
            old = saved.get(key)
            old = tuple(old) if isinstance(old, list) else old
            if key not in RESUMABLE and value != old:
                raise UsageError(
                    f"--{key.replace('_', '-')} {value} differs from the checkpoint's {old}: a "
                    "resumed run keeps its settings (and privacy ledger). Drop the option, or "
                    "start a new --out."
                )
        overrides = {k: v for k, v in given.items() if k in RESUMABLE}
        cfg = TrainConfig(out=str(args.out))
    else:
        if args.data is None:
            raise UsageError("--data is required (an MSD folder; write one with `dpseg phantoms`)")
        cfg = TrainConfig.from_dict({**given, "data": str(args.data), "out": str(args.out)})
        overrides = None
    report = run_training(cfg, resume=args.resume, overrides=overrides, progress=not args.quiet)
    eps = "inf (no DP)" if report["epsilon"] is None else f"{report['epsilon']:.2f}"
    dice = "n/a" if report["dice"] is None else f"{report['dice']:.3f}"
    print(
        f"validation Dice {dice}, epsilon {eps} (delta {report['delta']}), {report['steps']} steps "
        f"in {report['seconds'] / 60:.1f} min on {report['device']}; wrote {args.out}/report.md"
    )
    return 0


# --- predict -------------------------------------------------------------------------------
def add_predict_parser(sub) -> None:
    p = sub.add_parser(
        "predict",
        help="segment a NIfTI image with a trained checkpoint",
        description="Writes the predicted label map on the image's own shape and affine "
        "(orientation and any resampling undone), so it overlays the input in any viewer.",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="RUN/checkpoint.pt")
    p.add_argument("--image", type=Path, required=True, help="NIfTI image (.nii or .nii.gz)")
    p.add_argument("--out", type=Path, required=True, help="mask to write (.nii.gz)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (run's)")
    p.add_argument("--channel", type=int, default=None, help="channel of a 4-D image")
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only each organ's largest connected component (removes false-positive "
        "islands; the training report shows the validation Dice with and without it)",
    )
    p.set_defaults(func=_usage_errors(_run_predict))


def _run_predict(args) -> int:
    import torch

    from dpseg.train.predict import predict_file

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no CUDA device; use --device cpu"
        )
    path = predict_file(
        args.checkpoint,
        args.image,
        args.out,
        args.device,
        args.overlap,
        args.channel,
        largest_component=args.largest_component,
    )
    print(f"wrote {path}")
    return 0


# --- phantoms ------------------------------------------------------------------------------
def add_phantoms_parser(sub) -> None:
    p = sub.add_parser(
        "phantoms",
        help="write synthetic abdominal CT with liver masks in MSD layout",
        description="Generates CT phantoms (body, non-convex liver, spleen, kidneys, spine, "
        "lungs) from several simulated scanners, deterministic by seed; the site of each case "
        "is recorded in dataset.json.",
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=100)
    p.add_argument("--sites", type=int, default=1)
    p.add_argument("--size", type=int, default=64, help="voxels per edge")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_usage_errors(_run_phantoms))


def _run_phantoms(args) -> int:
    from dpseg.data import write_phantom_dataset

    path = write_phantom_dataset(
        args.out, args.cases, args.sites, size=args.size, seed=args.seed, progress=not args.quiet
    )
    print(f"wrote {args.cases} cases from {args.sites} site(s) to {path.parent}")
    return 0
