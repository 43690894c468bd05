"""nnUNetTrainerDP: nnU-Net v2's trainer, trained with DP-SGD at the case level.

What changes against nnUNetTrainer, and why (everything else is nnU-Net's own: the plans,
the network with deep supervision, the augmentation, the optimizer and its poly schedule,
validation on the fold's held-out cases, checkpoints and inference):

- Sampling. nnU-Net fills each batch position with a case drawn with replacement; here each
  training iteration is one logical DP step over a Poisson sample of the training cases at
  the declared rate q, and every sampled case brings k patches drawn by nnU-Net's loader
  (dpseg.nnunet.cases), foreground oversampling included. A case's k rows are averaged and
  clipped to C as one unit; noise N(0, sigma^2 C^2) is added once a step and the sum is
  divided by the declared expected cases E (nothing released depends on the number of
  training cases: add/remove adjacency). BatchMemoryManager cuts a logical batch into
  physical batches of whole cases (plans' batch size / k cases by default).
- Loss. The batch Dice is turned off (it couples cases), and the loss is held against its
  per-case terms on the first batch (dpseg.nnunet.loss).
- No global gradient clip (nnU-Net clips the batch gradient to 12; per-case clipping
  replaces it), no torch.compile (the capture hooks need eager modules), and fp32 (mixed
  precision under per-sample clipping is not covered by dpseg's oracle tests).
- The training loss is computed on private data and is not noised: it is logged as NaN
  unless ``log_train_loss`` is set.
- Validation. With fold "all" the validation cases are the training cases: a pseudo Dice on
  them would be released outside epsilon, so validation is skipped (a fold 0-4 whose
  validation cases overlap its training cases is refused). With a fold 0-4 the validation
  cases are held out of training: their pseudo Dice and the choice of checkpoint_best on
  them use those patients' data outside epsilon.
- The loss is checked once, before training, on a synthetic batch of two cases (noise and
  labels drawn from the plans' label set), since a physical batch may hold one case.
- Secret randomness. The Poisson draws and the noise seed come from OS entropy (torch's
  default generator, which nnU-Net leaves unseeded, starts from the same seed in every
  process, so its draws could be replayed), and checkpoints hold no noise seed (with it
  the noise could be regenerated and subtracted from the momentum buffer).
- What to release: the model (checkpoint_final) and privacy.json. The output folder also
  holds nnU-Net's dataset.json, fingerprint and logs, which state the number of training
  cases, which add/remove adjacency treats as private.
- Inference. The checkpoint names nnUNetTrainer as its trainer (the network is its), so
  ``nnUNetv2_predict ... -tr nnUNetTrainerDP`` predicts without further set-up.
- Ledger. Every checkpoint carries the privacy ledger (settings, sigma, the accountant's
  history) and ``privacy.json`` in the output folder holds the latest, with epsilon.
  The ledger is also written at every epoch's end (each epoch's model is logged). A
  resumed run (``--c``) starts from the largest ledger ever written for the fold, so
  epsilon never resets, and draws fresh noise: the steps between the checkpoint it resumes
  and the last checkpoint written were released once already (checkpoint_best may hold
  them), and replaying them with the same noise on other augmented patches would let the
  two releases cancel the noise.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import warnings
from pathlib import Path

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
    NonDetMultiThreadedAugmenter,
)
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from torch.utils.data import DataLoader

from dpseg.data import flatten_collate
from dpseg.nnunet.cases import CaseDataset, CasePatches
from dpseg.nnunet.loss import check_case_loss, refuse_batch_dice
from dpseg.nnunet.settings import PRIVACY_KEYS, DPSettings, noise_for_schedule, steps_planned
from dpseg.privacy import BatchMemoryManager, PrivacyEngine
from dpseg.privacy.secret import without_noise_seed
from dpseg.privacy.units import RowUnits

LEDGER_FILE = "privacy.json"
UNIT = "case"  # the engine's item: one training case with its k patches


def _seed_numpy_in_worker(worker_id: int) -> None:
    # nnU-Net's cropping and augmentation draw from numpy's global generator, which forked
    # workers would otherwise share state for (every worker drawing the same crops).
    np.random.seed(torch.initial_seed() % 2**32)  # noqa: NPY002 (nnU-Net's generator)


def _secret_generator() -> torch.Generator:
    # The Poisson draws and the noise must be secret: torch's default generator starts from
    # the same seed in every process that does not seed it (nnU-Net does not), so its draws
    # could be replayed. Both are seeded from OS entropy and never saved.
    return torch.Generator().manual_seed(secrets.randbits(63))


def _steps_in(ledger: dict | None) -> int:
    return sum(int(h[2]) for h in (ledger or {}).get("history", []))


class nnUNetTrainerDP(nnUNetTrainer):  # noqa: N801 (nnU-Net's trainers are named so)
    """nnU-Net's trainer with DP-SGD over cases; ``configure_dp`` before training."""

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnU-Net's signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.grad_scaler = None  # fp32, see the module's docstring
        self.dp: DPSettings | None = None
        self.noise_multiplier: float | None = None
        self.engine: PrivacyEngine | None = None
        self.private_network = None  # the PrivateModule around self.network
        self._physical = None  # the stream of physical batches
        self._resume: dict | None = None

    # --- set-up -----------------------------------------------------------------------
    def configure_dp(self, settings: DPSettings) -> None:
        if self.was_initialized:
            raise RuntimeError("configure_dp must come before the trainer is initialized")
        self.dp = settings

    @property
    def steps_planned(self) -> int:
        return steps_planned(self.num_epochs, self.num_iterations_per_epoch)

    def _do_i_compile(self) -> bool:
        return False

    def _build_loss(self):
        if self.configuration_manager.batch_dice:
            self.print_to_log_file(
                "DP: the plans ask for a batch Dice, which couples the cases of a batch; "
                "training with the per-case Dice instead"
            )
            self.configuration_manager.configuration["batch_dice"] = False
        loss = super()._build_loss()
        refuse_batch_dice(loss)
        return loss

    def initialize(self):
        if self.dp is None:
            raise RuntimeError(
                "nnUNetTrainerDP has no privacy settings: train it with `dpseg nnunet train "
                "DATASET CONFIGURATION FOLD --sample-rate Q --expected-cases E ...`, which "
                "declares them (nnUNetv2_train has no options to pass them)"
            )
        if self.is_ddp:
            raise RuntimeError(
                "nnUNetTrainerDP runs on one device: nnU-Net's multi-GPU training splits each "
                "batch by rank its own way, which is not the global Poisson draw dpseg "
                "accounts. Train with one GPU (-num_gpus 1)."
            )
        super().initialize()
        k = self.dp.patches_per_case
        self.physical_cases = self.dp.physical_cases or max(1, self.batch_size // k)

    def _validation_on_training_cases(self) -> bool:
        return self.fold == "all"

    def do_split(self):
        train, val = super().do_split()
        overlap = sorted(set(train) & set(val))
        if overlap and not self._validation_on_training_cases():
            raise ValueError(
                f"fold {self.fold} validates on {len(overlap)} of its training cases (e.g. "
                f"{overlap[:3]}): their pseudo Dice and the choice of checkpoint_best would "
                "be released outside epsilon. Fix splits_final.json so that each fold's "
                "validation cases are held out of its training cases."
            )
        return train, val

    # --- data -------------------------------------------------------------------------
    def get_dataloaders(self):
        patch_size = self.configuration_manager.patch_size
        scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        labels = self.label_manager
        regions = labels.foreground_regions if labels.has_regions else None
        train_transforms = self.get_training_transforms(
            patch_size, rotation, scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm,
            is_cascaded=self.is_cascaded, foreground_labels=labels.foreground_labels,
            regions=regions, ignore_label=labels.ignore_label,
        )  # fmt: skip
        dataset_tr, dataset_val = self.get_tr_and_val_datasets()
        patches = CasePatches(
            dataset_tr, self.dp.patches_per_case, initial_patch_size, patch_size, labels,
            oversample_foreground_percent=self.oversample_foreground_percent,
            sampling_probabilities=None, pad_sides=None, transforms=train_transforms,
            probabilistic_oversampling=self.probabilistic_oversampling,
        )  # fmt: skip
        workers = get_allowed_n_proc_DA()
        loader = DataLoader(
            CaseDataset(patches, dataset_tr.identifiers),
            batch_size=self.physical_cases,
            collate_fn=flatten_collate,
            num_workers=workers,
            worker_init_fn=_seed_numpy_in_worker if workers else None,
            generator=_secret_generator(),
        )
        self.check_loss_per_case()
        self._make_private(loader)

        val = None
        if self._validation_on_training_cases():
            self.print_to_log_file(
                "DP: fold 'all' validates on the training cases, whose pseudo Dice would be "
                "released outside epsilon: no validation during training"
            )
            self.num_val_iterations_per_epoch = 0
            self._best_ema = float("inf")  # no "best" checkpoint without a validation
        else:
            val_transforms = self.get_validation_transforms(
                scales, is_cascaded=self.is_cascaded,
                foreground_labels=labels.foreground_labels, regions=regions,
                ignore_label=labels.ignore_label,
            )  # fmt: skip
            dl_val = nnUNetDataLoader(
                dataset_val, self.batch_size, patch_size, patch_size, labels,
                oversample_foreground_percent=self.oversample_foreground_percent,
                sampling_probabilities=None, pad_sides=None, transforms=val_transforms,
                probabilistic_oversampling=self.probabilistic_oversampling,
            )  # fmt: skip
            if workers == 0:
                val = SingleThreadedAugmenter(dl_val, None)
            else:
                val = NonDetMultiThreadedAugmenter(
                    data_loader=dl_val, transform=None, num_processes=max(1, workers // 2),
                    num_cached=max(3, workers // 4), seeds=None,
                    pin_memory=self.device.type == "cuda", wait_time=0.002,
                )  # fmt: skip
        # One nnU-Net iteration is one logical DP step; train_step takes its physical
        # batches from the DP loader itself, so the "batch" nnU-Net hands over is empty.
        return itertools.repeat(None), val

    def check_loss_per_case(self) -> None:
        """Holds the loss against its per-case terms (dpseg.nnunet.loss) on a synthetic
        batch of two cases of k patches: with nnU-Net's batch of 2 and k = 2 a physical
        batch holds one case, so the training batches could never show a coupling. The
        inputs are noise and the labels drawn from the plans' labels (the ignore label
        included): no training case is read, and the check is of the loss's structure."""
        k = self.dp.patches_per_case
        labels = self.label_manager
        generator = torch.Generator().manual_seed(0)
        shape = (2 * k, self.num_input_channels, *self.configuration_manager.patch_size)
        dtype = next(self.network.parameters()).dtype
        x = torch.randn(shape, generator=generator, dtype=dtype).to(self.device)
        with torch.no_grad():
            output = self.network(x)
        outputs = output if isinstance(output, list | tuple) else [output]
        values = list(labels.all_labels)
        if labels.ignore_label is not None:
            values.append(labels.ignore_label)

        def target_like(o: torch.Tensor) -> torch.Tensor:
            if labels.has_regions:  # one binary channel a region
                return torch.randint(0, 2, o.shape, generator=generator).to(o.device, torch.int16)
            pick = torch.randint(0, len(values), (o.shape[0], 1, *o.shape[2:]), generator=generator)
            return torch.as_tensor(values, dtype=torch.int16)[pick].to(o.device)

        targets = [target_like(o) for o in outputs]
        target = targets if isinstance(output, list | tuple) else targets[0]
        check_case_loss(self.loss, output, target, RowUnits((k, k)))

    def _make_private(self, loader: DataLoader) -> None:
        self.engine = PrivacyEngine(accountant=self.dp.accountant)
        resume = self._resume
        if resume is not None:
            self.engine.load_state_dict(resume["ledger"])
            self.noise_multiplier = float(resume["noise_multiplier"])
        else:
            self.noise_multiplier = noise_for_schedule(self.dp, self.steps_planned)
        with warnings.catch_warnings():
            # the unit is declared here (the case) and reported in the ledger
            warnings.filterwarnings("ignore", message=".*per dataset item.*")
            private, optimizer, dp_loader = self.engine.make_private(
                module=self.network,
                optimizer=self.optimizer,
                data_loader=loader,
                noise_multiplier=self.noise_multiplier,
                max_grad_norm=self.dp.max_grad_norm,
                sample_rate=self.dp.sample_rate,
                expected_batch_size=self.dp.expected_cases,
                loss_reduction="mean",
                noise_seed=secrets.randbits(63),
            )
        if resume is not None:
            state = dict(resume["optimizer_state"])
            dp_state = dict(state.get("dpseg", {}))
            dp_state.pop("noise_seed", None)  # fresh noise on the resumed branch
            state["dpseg"] = dp_state
            optimizer.load_state_dict(state)
            self._resume = None
        self.private_network, self.optimizer = private, optimizer
        self._physical = self._physical_batches(dp_loader, optimizer)
        self.print_to_log_file(
            f"DP: q {self.dp.sample_rate}, E {self.dp.expected_cases} cases, k "
            f"{self.dp.patches_per_case} patches a case, C {self.dp.max_grad_norm}, sigma "
            f"{self.noise_multiplier:.4f} over {self.steps_planned} steps, physical batch "
            f"{self.physical_cases} cases; epsilon so far {self.epsilon():.3f}"
        )

    def _physical_batches(self, loader, optimizer):
        while True:  # one pass of the DP loader after another
            with BatchMemoryManager(
                data_loader=loader, max_physical_batch_size=self.physical_cases,
                optimizer=optimizer,
            ) as physical:  # fmt: skip
                yield from physical

    # --- the step ---------------------------------------------------------------------
    def train_step(self, batch=None) -> dict:
        taken = self.optimizer.steps_taken
        total, rows = 0.0, 0
        while self.optimizer.steps_taken == taken:  # the physical batches of one step
            data, target = next(self._physical)
            data = data.to(self.device, non_blocking=True)
            if isinstance(target, list):
                target = [t.to(self.device, non_blocking=True) for t in target]
            else:
                target = target.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            if data.shape[0]:  # an empty Poisson batch is a noise-only step
                loss = self.loss(self.private_network(data), target)
                loss.backward()
                if self.dp.log_train_loss:
                    total, rows = total + float(loss.detach()) * len(data), rows + len(data)
            self.optimizer.step()
        logged = total / rows if (self.dp.log_train_loss and rows) else float("nan")
        return {"loss": np.array(logged)}

    def on_train_epoch_end(self, train_outputs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of NaNs
            super().on_train_epoch_end(train_outputs)

    def on_validation_epoch_end(self, val_outputs):
        if val_outputs:
            return super().on_validation_epoch_end(val_outputs)
        nan = float("nan")
        labels = self.label_manager
        classes = len(labels.foreground_regions if labels.has_regions else labels.foreground_labels)
        self.logger.log("mean_fg_dice", nan, self.current_epoch)
        self.logger.log("dice_per_class_or_region", [nan] * classes, self.current_epoch)
        self.logger.log("val_losses", nan, self.current_epoch)

    def on_epoch_end(self):
        # every epoch's model is released to the log (its pseudo Dice) and progress.png:
        # the ledger counts it before a crash could lose it
        if self.local_rank == 0:
            self._write_ledger()
        super().on_epoch_end()
        self.print_to_log_file(f"DP: epsilon {self.epsilon():.3f} (delta {self.dp.delta})")

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self._validation_on_training_cases():
            self.print_to_log_file("DP: fold 'all': no validation on the training cases")
            return
        return super().perform_actual_validation(save_probabilities)

    # --- the ledger -------------------------------------------------------------------
    def epsilon(self) -> float:
        if self.engine is None:
            return 0.0
        return self.engine.get_epsilon(self.dp.delta)

    def privacy_record(self) -> dict:
        """What the ledger says, as privacy.json and the checkpoint's "dpseg" entry hold it."""
        ledger = self.engine.state_dict() if self.engine is not None else None
        epsilon = self.epsilon()
        return {
            "epsilon": epsilon,
            "delta": self.dp.delta,
            "unit": UNIT,
            "adjacency": "add/remove",
            "accountant": self.dp.accountant,
            "noise_multiplier": self.noise_multiplier,
            "steps_accounted": _steps_in(ledger),
            "steps_planned": self.steps_planned,
            "settings": self.dp.as_dict(),
            "ledger": ledger,
            "outside_epsilon": [
                "nnU-Net's plans (dataset fingerprint: spacings, shapes, CT intensity "
                "statistics) are computed from the training cases",
                "the output folder's dataset.json, fingerprint and logs state the number "
                "of training cases: release the model and this record, not the folder",
                "folds 0-4: the validation cases' own data (their pseudo Dice, and the "
                "choice of checkpoint_best on them)",
            ],
        }

    def _ledger_path(self) -> Path:
        return Path(self.output_folder) / LEDGER_FILE

    def save_checkpoint(self, filename: str) -> None:
        if self.engine is None:  # nothing trained privately yet
            return super().save_checkpoint(filename)
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        tmp = f"{filename}.tmp"
        super().save_checkpoint(tmp)
        record = self.privacy_record()
        checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
        # The noise seed keys every draw (Philox(seed, step)): with it, the noise could be
        # subtracted from the momentum buffer. A resumed run draws fresh noise anyway.
        checkpoint["optimizer_state"] = without_noise_seed(checkpoint["optimizer_state"])
        checkpoint["dpseg"] = record
        # The network is nnUNetTrainer's: under that name nnUNetv2_predict (-tr nnUNetTrainerDP
        # names the folder) rebuilds it without finding this class, which its search would
        # reach only by importing every trainer nnU-Net ships (its Primus ones need timm).
        checkpoint["dpseg_trainer"] = type(self).__name__
        checkpoint["trainer_name"] = "nnUNetTrainer"
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)
        self._write_ledger(record)

    def _write_ledger(self, record: dict | None = None) -> None:
        """privacy.json: only ever grows (a resumed branch starts from the largest)."""
        record = record or self.privacy_record()
        path = self._ledger_path()
        if _steps_in(_read_ledger(path)) <= record["steps_accounted"]:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(record, indent=1))
            os.replace(tmp, path)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not isinstance(filename_or_checkpoint, str | os.PathLike):
            raise TypeError("nnUNetTrainerDP resumes from a checkpoint file")
        if self.dp is None:
            raise RuntimeError("configure_dp(settings) before loading a checkpoint to continue")
        checkpoint = torch.load(filename_or_checkpoint, map_location="cpu", weights_only=False)
        record = checkpoint.get("dpseg")
        if record is None:
            raise ValueError(
                f"{filename_or_checkpoint} holds no privacy ledger: it was not written by "
                "nnUNetTrainerDP. To start DP training from weights trained elsewhere (public "
                "data only), pass them as pretrained weights instead of continuing (--c)."
            )
        self._check_same_privacy(record, filename_or_checkpoint)
        super().load_checkpoint(str(filename_or_checkpoint))
        ledger = record["ledger"]
        written = _read_ledger(self._ledger_path())
        if _steps_in(written) > _steps_in(ledger):
            # a later checkpoint (checkpoint_best, say) was written after this one
            self.print_to_log_file(
                f"DP: resuming from a checkpoint at {_steps_in(ledger)} steps, but this fold "
                f"released a model at {_steps_in(written)} steps; the ledger keeps the "
                "larger, so the final epsilon will exceed the target by the steps run again"
            )
            ledger = written
        self._resume = {
            "ledger": ledger,
            "noise_multiplier": record["noise_multiplier"],
            "optimizer_state": checkpoint["optimizer_state"],
        }

    def _check_same_privacy(self, record: dict, where) -> None:
        saved = record["settings"]
        now = self.dp.privacy()
        changed = [k for k in PRIVACY_KEYS if saved.get(k) != now[k]]
        if record["steps_planned"] != self.steps_planned:
            changed.append(f"steps planned ({record['steps_planned']} -> {self.steps_planned})")
        if changed:
            raise ValueError(
                f"{where} was trained under other privacy settings ({', '.join(changed)}); a "
                "ledger continues only under the settings it was started with. Resume with "
                "the same options, or start a new run in another results folder."
            )


def _read_ledger(path: Path) -> dict | None:
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return record.get("ledger") if isinstance(record, dict) else None
