"""`TrainConfig`: every setting of a single-site run, a flat dataclass saved into the
checkpoint (so `--resume` can refuse a changed setting)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

LR_SCHEDULES = ("constant", "cosine")  # dpseg.train.loop.lr_at, and federate's rounds

DEFAULT_STEPS = 200
ENGINES = ("dpseg", "opacus")
# "auto": the CT window for CT (or an undeclared modality), the volume's own 0.5-99.5
# percentiles for anything else: MR has no absolute scale (Task04's maxima run from ~100 to
# ~1.7e6; under the CT window 80% of a typical case's voxels saturate at 1).
NORMALIZE = ("auto", "window", "percentile", "zscore")


def resolve_normalize(normalize: str, modality: dict[str, str]) -> str:
    """The Preprocessing.normalize of a run: `normalize`, or for "auto" the one the
    dataset.json modality calls for."""
    if normalize != "auto":
        return normalize
    kinds = {str(v).strip().upper() for v in modality.values()}
    return "window" if not kinds or kinds == {"CT"} else "percentile"


@dataclass
class TrainConfig:
    """Settings of one run. `batch` is the expected batch size in patients. With
    `sample_rate` q declared, q and `batch` (the normaliser) are public constants, nothing
    released depends on the number of cases, and epsilon is for add/remove adjacency;
    without it q = 1 / ceil(cases / batch) reads the number of cases, which is then public,
    and epsilon is for replace-one adjacency. Each sampled patient brings
    `items_per_patient` patches (2-D: slices), averaged before clipping. DP is on unless
    `dp=False`; the noise comes from `noise_multiplier`, or is solved for `target_epsilon`
    over the planned steps, or is 1.0."""

    data: str = ""
    out: str = ""
    steps: int | None = None
    epochs: float | None = None
    patch: int = 32
    batch: int = 8
    sample_rate: float | None = None
    items_per_patient: int = 1
    # What the ledger calls the unit each MSD case is (dpseg.privacy.sampling_plan): say
    # "case" where a subject may have several cases (Task04: one crop per hemisphere).
    privacy_unit: str = "patient"
    dp: bool = True
    noise_multiplier: float | None = None
    max_grad_norm: float = 1.0
    target_epsilon: float | None = None
    delta: float = 1e-5
    engine: str = "dpseg"
    accountant: str = "prv"
    backend: str = "auto"
    device: str = "cpu"
    optimizer: str = "adam"
    lr: float = 1e-3
    lr_schedule: str = "constant"
    momentum: float = 0.9
    channels: tuple[int, ...] = (8, 16, 32)
    spatial_dims: int = 3
    norm: str = "group"
    upsample: str = "transpose"
    channel: int | None = None
    site: str | None = None
    spacing: tuple[float, float, float] | None = None
    val_fraction: float = 0.2
    p_foreground: float = 0.5
    overlap: float = 0.25
    seed: int = 0
    # fixes the run's secret (dpseg.privacy.secret): sampling and noise as public as this
    secret_seed: int | None = None
    split: str | None = None  # FILE[:KEY]: train only on this list of cases (dpseg.train.splits)
    # a checkpoint or state_dict to start from, trained on data disjoint from `data`
    # (dpseg.train.init_weights refuses one that saw these cases)
    init: str | None = None
    normalize: str = "auto"  # intensities: see NORMALIZE
    eval_every: int = 0
    checkpoint_every: int = 50
    epsilon_every: int = 10
    nproc: int = 1  # processes (torch.distributed) training this site together
    threads: int | None = None  # torch threads per process (default: cores / nproc)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in values.items() if k in known})
        cfg.channels = tuple(int(c) for c in cfg.channels)
        if cfg.spacing is not None:
            cfg.spacing = tuple(float(s) for s in cfg.spacing)
        return cfg

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["spacing"] = list(self.spacing) if self.spacing is not None else None
        return d

    def check(self) -> None:
        """ValueError naming the setting to change."""
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        div = 2 ** (len(self.channels) - 1)
        if self.patch < div or self.patch % div:
            raise ValueError(
                f"patch {self.patch} must be a multiple of {div} for a U-Net of "
                f"{len(self.channels)} levels (channels {self.channels})"
            )
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.items_per_patient < 1:
            raise ValueError(f"items_per_patient must be >= 1, got {self.items_per_patient}")
        if self.items_per_patient > 1 and self.dp and self.engine != "dpseg":
            raise ValueError(
                "items_per_patient > 1 needs engine 'dpseg': Opacus clips each row alone, so "
                "a patient's k patches would move the update by k C"
            )
        from dpseg.privacy.sampling_plan import check_unit_name

        check_unit_name(self.privacy_unit)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}"
            )
        if self.dp and self.target_epsilon is not None and self.noise_multiplier is not None:
            raise ValueError("give either noise_multiplier or target_epsilon, not both")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.nproc > 1 and self.dp and self.engine != "dpseg":
            raise ValueError("nproc > 1 runs dpseg's distributed DP step; use engine 'dpseg'")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.target_epsilon is not None and not self.target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {self.target_epsilon}")
