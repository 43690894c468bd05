"""An MSD folder (dpseg's loaders' layout) as an nnU-Net v2 raw dataset, restricted to a
case list: the training cases go to imagesTr/labelsTr and nothing else, so that nnU-Net's
planning, its folds and its fold "all" never see a held-out case; the held-out cases go to
imagesTs (labels to labelsTs) for nnUNetv2_predict. Files are symbolic links: the volumes
stay where they are (../shared/data is read, never copied)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib

from dpseg.data import DataError


def _msd_cases(msd: Path) -> dict[str, tuple[Path, Path]]:
    try:
        meta = json.loads((msd / "dataset.json").read_text())
    except OSError as exc:
        raise DataError(f"{msd}: no dataset.json ({exc.strerror}); give an MSD folder") from None
    cases = {}
    for entry in meta.get("training", []):
        image = (msd / entry["image"]).resolve()
        label = (msd / entry["label"]).resolve()
        name = image.name.removesuffix(".nii.gz").removesuffix(".nii")
        cases[name] = (image, label)
    if not cases:
        raise DataError(f"{msd}/dataset.json lists no labelled training cases")
    return cases


def msd_to_nnunet(
    msd: Path,
    raw: Path,
    dataset_id: int,
    train: list[str],
    test: list[str] = (),
    name: str | None = None,
) -> Path:
    """Writes ``raw``/Dataset<id, 3 digits>_<name> from ``msd``; returns that folder."""
    msd, raw = Path(msd), Path(raw)
    meta = json.loads((msd / "dataset.json").read_text()) if (msd / "dataset.json").exists() else {}
    cases = _msd_cases(msd)
    unknown = sorted((set(train) | set(test)) - set(cases))
    if unknown:
        raise DataError(f"{msd} has no case(s) {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    both = sorted(set(train) & set(test))
    if both:
        raise DataError(f"case(s) {both[:5]} are listed for both training and test")
    if not 1 <= dataset_id <= 999:
        raise DataError(f"an nnU-Net dataset id is 1-999, got {dataset_id}")
    first = nib.load(cases[train[0]][0])
    if len(first.shape) != 3:
        raise DataError(
            f"{cases[train[0]][0]} has shape {first.shape}: one 3-D volume per case is "
            "expected (a 4-D MSD image holds several modalities; convert it with "
            "nnUNetv2_convert_MSD_dataset)"
        )
    name = name or str(meta.get("name", msd.name)).replace(" ", "")
    folder = raw / f"Dataset{dataset_id:03d}_{name}"
    subs = [folder / sub for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")]
    # A re-import must not keep the links of an earlier case list: a case moved from
    # training to test would stay in imagesTr. Only links this function wrote are removed.
    for sub in subs:
        if sub.exists():
            kept = [p for p in sub.iterdir() if not p.is_symlink()]
            if kept:
                raise DataError(
                    f"{sub} holds files that are not links this command wrote (e.g. "
                    f"{kept[0].name}); give another --id or remove that dataset first"
                )
            for p in sub.iterdir():
                p.unlink()
        sub.mkdir(parents=True, exist_ok=True)

    def link(target: Path, at: Path) -> None:
        os.symlink(target, at)

    for group, names in (("Tr", train), ("Ts", test)):
        for case in names:
            image, label = cases[case]
            link(image, folder / f"images{group}" / f"{case}_0000.nii.gz")
            link(label, folder / f"labels{group}" / f"{case}.nii.gz")
    labels = {v: int(k) for k, v in meta.get("labels", {"0": "background", "1": "1"}).items()}
    modality = meta.get("modality", {"0": "image"})
    dataset_json = {
        "channel_names": {str(k): v for k, v in modality.items()},
        "labels": labels,
        "numTraining": len(train),
        "file_ending": ".nii.gz",
        "name": name,
        "source": f"{msd.resolve()} (training cases only; held-out cases in imagesTs)",
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
    return folder
