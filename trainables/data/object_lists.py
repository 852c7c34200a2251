"""Event-level object lists read in a trial: padded objects, their mask, encoded labels."""

from __future__ import annotations

import numpy as np

from trainables.data.setup import DataSetup
from trainables.data.targets import encode_labels


class ObjectDataset:
    """Items: ((objects float32 (n_objects, n_features), mask bool (n_objects,)), label)."""

    def __init__(self, setup: DataSetup | dict, indices: list[int], **_):
        import h5py

        s = setup if isinstance(setup, DataSetup) else DataSetup(**setup)
        idx = np.asarray(indices, dtype=np.int64)
        with h5py.File(s.path, "r") as f:
            x = f[s.image_key][...][idx].astype(np.float32)
            mask = f[s.mask_key][...][idx].astype(bool) if s.mask_key else np.ones(x.shape[:2], bool)
            y = f[s.label_key][...][idx]
            t = f[s.target_key][...][idx] if s.target_key else None
        if s.mean is not None:
            x = (x - np.asarray(s.mean, np.float32)) / np.asarray(s.std, np.float32)
        self.x = np.where(mask[..., None], x, 0).astype(np.float32)
        self.mask = mask
        self.y = encode_labels(s, y, t)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        import torch

        return (torch.from_numpy(self.x[i]), torch.from_numpy(self.mask[i:i + 1][0])), torch.tensor(self.y[i])
