"""`dpseg nnunet`: nnU-Net v2 trained with DP-SGD over cases.

    nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres
    dpseg nnunet train 4 3d_fullres all --sample-rate 0.2 --expected-cases 32 \\
        --target-epsilon 8 --epochs 20 --iterations-per-epoch 50
    dpseg nnunet predict -i imagesTs -o pred -d 4 -c 3d_fullres -f all

nnU-Net's own environment (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) says where the
data and results are, as for nnUNetv2_train. nnunetv2 is imported only inside the commands,
after dpseg.nnunet.requirement has checked it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dpseg.cli_types import UsageError, add_freed_memory_option


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_nnunet_parser(sub) -> None:
    p = sub.add_parser(
        "nnunet",
        help="nnU-Net v2 with DP-SGD over cases: train, predict, import an MSD folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
    )
    nsub = p.add_subparsers(dest="nnunet_command", metavar="COMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = nsub.add_parser(
        "train",
        help="nnUNetv2_train with nnUNetTrainerDP (or nnUNetTrainer with --no-dp)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Trains nnU-Net's plans, network, augmentation and optimizer with DP-SGD: each "
            "iteration is one step over a Poisson sample of the training cases (rate q), k "
            "patches a sampled case clipped together as one case (C), Gaussian noise sized to "
            "spend --target-epsilon over epochs x iterations, divided by the declared "
            "expected cases E. The ledger (epsilon, delta, unit: case) goes into every "
            "checkpoint and into OUTPUT/fold_F/privacy.json; --c continues it."
        ),
    )
    t.add_argument("dataset", help="dataset name or id, as for nnUNetv2_train")
    t.add_argument("configuration", help="e.g. 3d_fullres")
    t.add_argument("fold", help="0-4, or 'all' (every training case; no validation under DP)")
    t.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier")
    t.add_argument("--no-dp", action="store_true", help="nnU-Net's own trainer, same schedule")
    t.add_argument("--sample-rate", type=float, help="q: each case's chance to be in a step")
    t.add_argument(
        "--expected-cases",
        type=float,
        help="E: the normaliser, the expected cases a step; declared, not read from the data "
        "(q times a public estimate of the number of cases, not the exact private count)",
    )
    t.add_argument("--patches-per-case", type=_positive_int, default=2, help="k (default 2)")
    t.add_argument("--max-grad-norm", type=float, default=1.0, help="C (default 1)")
    t.add_argument("--target-epsilon", type=float, default=None, help="default 8")
    t.add_argument("--noise-multiplier", type=float, default=None, help="sigma, instead")
    t.add_argument("--delta", type=float, default=1e-5)
    t.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    t.add_argument(
        "--physical-cases",
        type=_positive_int,
        default=None,
        help="cases a physical batch (default: the plans' batch size / k)",
    )
    t.add_argument("--epochs", type=_positive_int, default=1000, help="nnU-Net's default 1000")
    t.add_argument(
        "--iterations-per-epoch", type=_positive_int, default=250, help="steps an epoch (250)"
    )
    t.add_argument(
        "--val-iterations", type=int, default=None, help="validation batches an epoch (50)"
    )
    t.add_argument("--lr", type=float, default=None, help="initial learning rate (1e-2)")
    t.add_argument("--save-every", type=_positive_int, default=None, help="epochs (50)")
    t.add_argument("--log-train-loss", action="store_true", help="log the un-noised loss")
    t.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--no-final-validation", action="store_true")
    t.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    t.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    add_freed_memory_option(t)
    t.set_defaults(func=_train)

    pr = nsub.add_parser(
        "predict",
        help="nnUNetv2_predict, with -tr nnUNetTrainerDP by default",
        add_help=False,
        description="Every argument goes to nnUNetv2_predict (its -h lists them); give "
        "-tr nnUNetTrainerDP (the default here) for a DP model.",
    )
    pr.add_argument("args", nargs=argparse.REMAINDER)
    pr.set_defaults(func=_predict)

    im = nsub.add_parser(
        "import-msd",
        help="an MSD folder as an nnU-Net raw dataset (nnUNet_raw/Dataset<id>_<name>), its "
        "training cases from a split list",
    )
    im.add_argument("--data", type=Path, required=True, help="MSD folder")
    im.add_argument("--id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    im.add_argument("--name", default=None, help="dataset name (default: dataset.json's)")
    im.add_argument(
        "--split",
        default=None,
        metavar="FILE",
        help="split file: its 'train' list goes to imagesTr, its 'test' list to imagesTs "
        "(default: every case to imagesTr)",
    )
    im.add_argument("--train-key", default="train", help="the split's training list")
    im.set_defaults(func=_import_msd)


def _need_nnunet() -> None:
    from dpseg.nnunet.requirement import NnUNetMissingError, require_nnunet

    try:
        require_nnunet()
    except NnUNetMissingError as exc:
        raise UsageError(str(exc)) from None


def _need_env(*names: str) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise UsageError(
            f"set {', '.join(missing)} as for nnU-Net's own commands (nnUNet_raw, "
            "nnUNet_preprocessed, nnUNet_results: where its datasets and results live)"
        )


def _settings(args):
    from dpseg.nnunet.settings import DPSettings

    if args.sample_rate is None or args.expected_cases is None:
        raise UsageError(
            "DP needs --sample-rate Q and --expected-cases E, declared before training (so "
            "that nothing released depends on how many cases there are); e.g. for 160 cases "
            "--sample-rate 0.2 --expected-cases 32. Or --no-dp for nnU-Net's own trainer."
        )
    epsilon = args.target_epsilon
    if epsilon is None and args.noise_multiplier is None:
        epsilon = 8.0
    try:
        return DPSettings(
            sample_rate=args.sample_rate,
            expected_cases=args.expected_cases,
            patches_per_case=args.patches_per_case,
            max_grad_norm=args.max_grad_norm,
            target_epsilon=epsilon,
            noise_multiplier=args.noise_multiplier,
            delta=args.delta,
            accountant=args.accountant,
            physical_cases=args.physical_cases,
            log_train_loss=args.log_train_loss,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _train(args) -> int:
    _need_nnunet()
    _need_env("nnUNet_preprocessed", "nnUNet_results")
    settings = None if args.no_dp else _settings(args)
    import torch

    from dpseg.nnunet.launch import make_trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trainer = make_trainer(
        args.dataset, args.configuration, args.fold, args.plans, device,
        continue_training=args.c, settings=settings, epochs=args.epochs,
        iterations_per_epoch=args.iterations_per_epoch, val_iterations=args.val_iterations,
        lr=args.lr, save_every=args.save_every,
    )  # fmt: skip
    from nnunetv2.run.run_training import maybe_load_checkpoint

    start = time.time()
    maybe_load_checkpoint(trainer, args.c, False)
    trainer.run_training()
    if not args.no_final_validation:
        trainer.perform_actual_validation(False)
    minutes = (time.time() - start) / 60
    line = f"dpseg nnunet: trained in {minutes:.1f} min; results in {trainer.output_folder}"
    if settings is not None:
        line += (
            f"; epsilon {trainer.epsilon():.3f} (delta {settings.delta}, unit case; "
            f"{Path(trainer.output_folder) / 'privacy.json'})"
        )
    print(line)
    return 0


def _predict(args) -> int:
    return predict_main(list(args.args))


def predict_main(forwarded: list[str]) -> int:
    """nnUNetv2_predict with nnUNetTrainerDP as the default trainer folder (a model of
    `dpseg nnunet train --no-dp` is nnUNetTrainer's: give -tr nnUNetTrainer)."""
    _need_nnunet()
    _need_env("nnUNet_results")
    forwarded = list(forwarded)
    if "-tr" not in forwarded:
        forwarded += ["-tr", "nnUNetTrainerDP"]
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point

    argv, sys.argv = sys.argv, ["nnUNetv2_predict", *forwarded]
    try:
        predict_entry_point()
    finally:
        sys.argv = argv
    return 0


def _import_msd(args) -> int:
    from dpseg.data import DataError
    from dpseg.nnunet.convert import _msd_cases, msd_to_nnunet

    _need_env("nnUNet_raw")
    try:
        if args.split:
            from dpseg.train.splits import read_case_list

            train = read_case_list(f"{args.split}:{args.train_key}")
            try:
                test = read_case_list(f"{args.split}:test")
            except DataError:
                test = []
        else:
            train, test = sorted(_msd_cases(args.data)), []
        folder = msd_to_nnunet(
            args.data, Path(os.environ["nnUNet_raw"]), args.id, list(train), list(test), args.name
        )
    except DataError as exc:
        raise UsageError(str(exc)) from None
    print(f"{folder}: {len(train)} training cases (imagesTr), {len(test)} held out (imagesTs)")
    return 0
