"""Builds the trainer as nnUNetv2_train does (nnunetv2.run.run_training), with dpseg's DP
trainer and the schedule given on the command line instead of a trainer variant per
schedule. Imports nnunetv2: call after dpseg.nnunet.requirement.require_nnunet()."""

from __future__ import annotations

import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from dpseg.nnunet.settings import DPSettings
from dpseg.nnunet.trainer import nnUNetTrainerDP


def make_trainer(
    dataset: str,
    configuration: str,
    fold: str,
    plans_identifier: str = "nnUNetPlans",
    device: torch.device | None = None,
    *,
    continue_training: bool = False,
    settings: DPSettings | None = None,
    epochs: int = 1000,
    iterations_per_epoch: int = 250,
    val_iterations: int | None = None,
    lr: float | None = None,
    save_every: int | None = None,
) -> nnUNetTrainer:
    """nnUNetTrainerDP with ``settings``, or nnUNetTrainer without (the non-private
    baseline on the same schedule)."""
    fold = fold if fold == "all" else int(fold)
    name = (
        dataset
        if str(dataset).startswith("Dataset")
        else maybe_convert_to_dataset_name(int(dataset))
    )
    base = join(nnUNet_preprocessed, name)
    plans = load_json(join(base, plans_identifier + ".json"))
    plans["continue_training"] = continue_training
    dataset_json = load_json(join(base, "dataset.json"))
    cls = nnUNetTrainer if settings is None else nnUNetTrainerDP
    trainer = cls(
        plans=plans, configuration=configuration, fold=fold, dataset_json=dataset_json,
        device=device or torch.device("cpu"),
    )  # fmt: skip
    if settings is not None:
        trainer.configure_dp(settings)
    # before initialize(): the poly schedule is built from num_epochs there
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = iterations_per_epoch
    if val_iterations is not None:
        trainer.num_val_iterations_per_epoch = val_iterations
    if lr is not None:
        trainer.initial_lr = lr
    if save_every is not None:
        trainer.save_every = save_every
    return trainer
