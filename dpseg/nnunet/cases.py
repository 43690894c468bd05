"""nnU-Net's training cases as a dataset of privacy units: item i is case i's k patches.

nnU-Net's training loader (nnUNetDataLoader) fills each batch position with a case drawn
with replacement, so a step's batch is not a Poisson sample of cases and one case can fill
two positions, which per-row clipping would clip as two. Here Poisson sampling is dpseg's
(over this dataset's items, the cases), and each sampled case brings k patches drawn by
nnU-Net's own code: :class:`CasePatches` is nnUNetDataLoader with its batch made of k
patches of one case, so cropping, padding, nnU-Net's foreground oversampling (of the k
positions, those from round(k * (1 - 0.33)) on are forced to contain foreground, as in a
batch of k: one of 2, one of 3, none of 1) and the full training augmentation run
unchanged. The k rows go to the loader as one list, which dpseg counts as one unit and
clips as one (dpseg.privacy.units).
"""

from __future__ import annotations

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch.utils.data import Dataset


class CasePatches(nnUNetDataLoader):
    """nnUNetDataLoader whose "batch" is ``k`` patches of the one case it is asked for."""

    def __init__(self, data, k: int, *args, **kwargs):
        super().__init__(data, k, *args, **kwargs)
        self._case: str | None = None

    def get_indices(self) -> list[str]:
        return [self._case] * self.batch_size

    def patches_of(self, case: str) -> dict:
        """{'data': (k, C, *patch), 'target': (k, 1, *patch) or one per deep-supervision
        scale, 'keys'} for ``case``, augmented as nnU-Net augments a training batch."""
        self._case = case
        try:
            return self.generate_train_batch()
        finally:
            self._case = None


class CaseDataset(Dataset):
    """Map-style dataset of training cases for dpseg's Poisson loader: item i is case i's k
    patches, a list of rows (data, target or one target per deep-supervision scale)."""

    def __init__(self, patches: CasePatches, identifiers):
        self.patches = patches
        self.identifiers = list(identifiers)

    def __len__(self) -> int:
        return len(self.identifiers)

    def __getitem__(self, i: int) -> list[tuple]:
        batch = self.patches.patches_of(self.identifiers[i])
        data, target = batch["data"], batch["target"]
        rows = []
        for j in range(data.shape[0]):
            t = [s[j] for s in target] if isinstance(target, list) else target[j]
            rows.append((data[j], t))
        return rows


__all__ = ["CaseDataset", "CasePatches"]
