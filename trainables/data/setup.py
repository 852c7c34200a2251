"""What a worker needs to read the data (:class:`DataSetup`): plain values, computed before Ray starts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DataSetup:
    """Everything a worker needs to read the data; plain values, shipped to Ray."""

    path: str
    image_key: str
    label_key: str
    layout: str
    channels: list[int]
    in_chans: int
    img_size: tuple[int, int]
    task: str
    num_classes: int
    train: list[int]
    val: list[int]
    test: list[int]
    mean: list[float] | None
    std: list[float] | None
    target_mean: float = 0.0
    target_std: float = 1.0
    extra: dict = field(default_factory=dict)
    # Preprocessing (see trainables/data/transforms.py); img_size above is the size after resize.
    src_size: tuple[int, int] | None = None
    """(H, W) of the file's images, before resize."""
    zero_suppress: float = 0.0
    clip: list[float] | None = None
    log1p: bool = False
    resize: list[int] | None = None
    resize_mode: str = "crop"
    flip_augment: bool = False
    cache: str = "none"
    kind: str = "images"
    """``images`` or ``objects`` (padded object lists: image_key (N, n_objects, n_features) and mask_key)."""
    mask_key: str | None = None
    target_key: str | None = None
    """Joint task: the regression target's key (label_key then holds the class label)."""
    fill: float | None = None
    """Images: fraction of the pixels of a sample of training images that differ from an empty pixel after the
    per-pixel transforms (what ``data.cache: auto`` decides on; trainables/data/sparse_cache.py)."""
    sparse_dir: str | None = None
    """``cache: sparse``: the absolute folder of the sparse cache planned for this data (its key is re-checked
    against the source when a trial opens it)."""
    slot_types: list[int] | None = None
    """Objects: the type of each slot (the file's ``object_type`` dataset, when every event has the same types
    per slot), for ``object_embedding: type``; None otherwise."""
    label_order: list[int] | None = None
    """The training indices in the order ``label_fraction`` < 1 keeps their labels (stratified by class;
    trainables/data/labelled.py); None: one shuffle of ``train``."""

    def transform_steps(self) -> list[str]:
        """The deterministic per-image transforms, in order (trainables/data/transforms.py), before normalization."""
        steps = []
        if self.zero_suppress > 0:
            steps.append(f"zero_suppress |x| < {self.zero_suppress:g}")
        if self.clip is not None:
            steps.append(f"clip [{self.clip[0]:g}, {self.clip[1]:g}]")
        if self.log1p:
            steps.append("log1p (negatives to 0 first)")
        if self.resize and self.src_size and tuple(self.src_size) != tuple(self.img_size):
            steps.append(f"{self.resize_mode} {self.src_size[0]}x{self.src_size[1]}->{self.img_size[0]}x{self.img_size[1]}")
        return steps

    def preprocessing(self) -> str:
        steps = self.transform_steps()
        if self.flip_augment:
            steps.append("training flips")
        if self.cache == "sparse" and self.fill is not None:
            steps.append(f"sparse cache ({self.fill:.2%} of pixels non-zero)")
        elif self.cache != "none":
            steps.append(f"cache in {self.cache}")
        return ", ".join(steps)

    def summary(self) -> str:
        kind = {"classification": f"{self.num_classes} classes", "regression": f"target '{self.label_key}'",
                "joint": f"{self.num_classes} classes + target '{self.target_key}'"}[self.task]
        return (
            f"{self.path}: {len(self.train)}/{len(self.val)}/{len(self.test)} train/val/test, "
            + (f"events of {self.img_size[0]} objects x {self.img_size[1]} features, {kind}" if self.kind == "objects"
               else f"{self.in_chans}x{self.img_size[0]}x{self.img_size[1]} images, {kind}")
            + (f", preprocessing: {self.preprocessing()}" if self.preprocessing() else "")
        )

    def to_dict(self) -> dict:
        return asdict(self)
