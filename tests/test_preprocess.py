"""Preprocessing options and the in-memory cache of the ``data`` section (no Ray)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from e2e_search.data.inspect import inspect
from e2e_search.spec.loader import validate
from tests.conftest import base_config, write_e2e
from trainables.data.images import H5ImageDataset, read_images
from trainables.data.setup import DataSetup
from trainables.data.transforms import preprocess, to_chw
from trainables.errors import UserError

KNOWN = [-1.0, 0.0, 0.5, float(np.e - 1), 10.0]  # pixels (0, 0..4) of channel 0 of every image


def _file(tmp_path, name="d.h5", **kw):
    return write_e2e(tmp_path / name, **{"n": 40, **kw})


def _known_file(tmp_path):
    path = _file(tmp_path, "known.h5")
    with h5py.File(path, "r+") as f:
        X = f["X_jets"][...]
        X[:, 0, :5, 0] = KNOWN
        f["X_jets"][...] = X
    return path


def _setup(tmp_path, path, **data) -> DataSetup:
    cfg = validate(base_config(tmp_path, path, data={"path": str(path), **data}), source="t.yaml")
    return inspect(cfg)


def _raw(setup: DataSetup, j: int) -> np.ndarray:
    with h5py.File(setup.path, "r") as f:
        return to_chw(f[setup.image_key][j], setup.layout)[setup.channels].astype(np.float32)


def _items(ds) -> torch.Tensor:
    return torch.stack([ds[i][0] for i in range(len(ds))])


@pytest.mark.parametrize("opts,expect", [
    ({"log1p": True}, [0.0, 0.0, np.log1p(0.5), 1.0, np.log1p(10.0)]),
    ({"clip": [0, 2]}, [0.0, 0.0, 0.5, np.e - 1, 2.0]),
    ({"zero_suppress": 0.6}, [-1.0, 0.0, 0.0, np.e - 1, 10.0]),
    # order: zero_suppress -> clip -> log1p
    ({"zero_suppress": 0.6, "clip": [-0.5, 5], "log1p": True}, [0.0, 0.0, 0.0, 1.0, np.log1p(5.0)]),
    ({"clip": [-3, 0.2], "zero_suppress": 0.3}, [-1.0, 0.0, 0.2, 0.2, 0.2]),  # suppressed before clipped
])
def test_pixel_transforms_on_known_values(tmp_path, opts, expect):
    s = _setup(tmp_path, _known_file(tmp_path), normalize="none", **opts)
    for split in (s.train, s.val):
        x, _ = H5ImageDataset(s, split)[0]
        np.testing.assert_allclose(x[0, 0, :5].numpy(), expect, rtol=1e-6, atol=1e-7)
    # the other pixels follow the same rule
    raw = _raw(s, s.train[1])
    x = H5ImageDataset(s, s.train)[1][0].numpy()
    ref = raw.copy()
    ref[np.abs(ref) < opts.get("zero_suppress", 0.0)] = 0
    if "clip" in opts:
        ref = np.clip(ref, *opts["clip"])
    if opts.get("log1p"):
        ref = np.log1p(np.maximum(ref, 0))
    np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-7)


def test_resize_crop_takes_the_centre(tmp_path):
    s = _setup(tmp_path, _file(tmp_path, size=16), normalize="none", resize=[8, 12], resize_mode="crop")
    assert s.img_size == (8, 12) and s.src_size == (16, 16)
    x = H5ImageDataset(s, s.train)[0][0].numpy()
    assert x.shape == (3, 8, 12)
    np.testing.assert_array_equal(x, _raw(s, s.train[0])[:, 4:12, 2:14])


def test_resize_pad_crop_pads_with_zeros_or_crops_per_axis(tmp_path):
    s = _setup(tmp_path, _file(tmp_path, size=16), normalize="none", resize=[21, 11], resize_mode="pad_crop")
    assert s.img_size == (21, 11)
    x = H5ImageDataset(s, s.val)[0][0].numpy()
    assert x.shape == (3, 21, 11)
    raw = _raw(s, s.val[0])
    # H: 16 -> 21, 2 rows of zeros before and 3 after; W: 16 -> 11, columns 2..12 kept
    np.testing.assert_array_equal(x[:, 2:18], raw[:, :, 2:13])
    assert not x[:, :2].any() and not x[:, 18:].any()


@pytest.mark.parametrize("size", [[8, 8], [4, 2], [5, 7]])
def test_resize_avgpool_conserves_the_mean(tmp_path, size):
    s = _setup(tmp_path, _file(tmp_path, size=16), normalize="none", resize=size, resize_mode="avgpool")
    assert s.img_size == tuple(size)
    ds = H5ImageDataset(s, s.train)
    for i in (0, 1, 2):
        x = ds[i][0].numpy()
        raw = _raw(s, s.train[i])
        assert x.shape == (3, *size)
        pooled = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(raw), size).numpy()
        np.testing.assert_allclose(x, pooled, rtol=1e-6)
        if 16 % size[0] == 0 and 16 % size[1] == 0:  # disjoint blocks: the mean is conserved exactly
            np.testing.assert_allclose(x.mean(axis=(1, 2)), raw.mean(axis=(1, 2)), rtol=1e-5)
        # (sizes that do not divide the image use torch's overlapping windows: the mean is only close)
    if size == [8, 8]:
        np.testing.assert_allclose(x, raw.reshape(3, 8, 2, 8, 2).mean(axis=(2, 4)), rtol=1e-5)


def test_flips_only_in_training_and_both_occur(tmp_path):
    s = _setup(tmp_path, _file(tmp_path), normalize="none", flip_augment=True)
    plain = H5ImageDataset(s, s.train)[0][0]
    assert torch.equal(H5ImageDataset(s, s.val)[0][0], torch.from_numpy(_raw(s, s.val[0])))  # val: never flipped
    assert all(torch.equal(H5ImageDataset(s, s.train)[0][0], plain) for _ in range(20))  # train=False: never
    variants = {"none": plain, "eta": plain.flip(1), "phi": plain.flip(2), "both": plain.flip(1, 2)}
    assert len({v.numpy().tobytes() for v in variants.values()}) == 4  # the image has no symmetry

    def draws(seed):
        ds = H5ImageDataset(s, s.train, train=True, seed=seed)
        out = []
        for _ in range(200):
            x = ds[0][0]
            out.append(next(k for k, v in variants.items() if torch.equal(x, v)))  # StopIteration if not a flip
        return out

    seen = draws(7)
    counts = {k: seen.count(k) for k in variants}
    assert all(c > 25 for c in counts.values()), counts  # each ~50 of 200
    assert draws(7) == seen and draws(8) != seen  # seeded
    off = _setup(tmp_path, _file(tmp_path), normalize="none", flip_augment=False)
    ds = H5ImageDataset(off, off.train, train=True, seed=7)
    assert all(torch.equal(ds[0][0], plain) for _ in range(20))


def test_memory_cache_gives_the_same_items(tmp_path):
    path = _file(tmp_path, n=60, size=16)
    opts = dict(zero_suppress=0.05, clip=[0, 3], log1p=True, resize=[8, 8], resize_mode="avgpool")
    s0 = _setup(tmp_path, path, **opts)
    s1 = _setup(tmp_path, path, cache="memory", **opts)
    assert s0.mean == s1.mean and s1.cache == "memory"
    for split in (s0.train, s0.val, s0.val[1::2]):
        a, b = H5ImageDataset(s0, split), H5ImageDataset(s1, split)
        assert b._images is not None and b._images.shape == (len(split), 3, 8, 8)
        assert torch.equal(_items(a), _items(b))
        assert [int(a[i][1]) for i in range(len(a))] == [int(b[i][1]) for i in range(len(b))]
    b = H5ImageDataset(s1, s1.train)
    b[0][0].add_(100.0)  # items are copies: the cache is not changed by the caller
    assert torch.equal(b[0][0], H5ImageDataset(s0, s0.train)[0][0])


def test_chunked_read_matches_per_item_reads_in_any_order(tmp_path):
    s = _setup(tmp_path, _file(tmp_path, n=60, size=16), log1p=True, resize=[10, 10], resize_mode="pad_crop")
    idx = [41, 3, 17, 0, 59, 18, 19, 20, 2, 55, 30]
    with h5py.File(s.path, "r") as f:
        got = read_images(f["X_jets"], idx, s, chunk=3)
        ref = np.stack([preprocess(to_chw(f["X_jets"][j], s.layout)[None], s)[0] for j in idx])
    np.testing.assert_array_equal(got, ref)


def test_statistics_are_computed_after_the_transforms(tmp_path):
    path = _file(tmp_path, n=80, size=16)
    s = _setup(tmp_path, path, log1p=True, resize=[8, 8], resize_mode="avgpool", stats_samples=1000)
    raw = np.stack([_raw(s, j) for j in s.train])
    expect = np.log1p(np.maximum(raw, 0)).reshape(len(raw), 3, 8, 2, 8, 2).mean(axis=(3, 5))
    np.testing.assert_allclose(s.mean, expect.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(s.std, expect.std(axis=(0, 2, 3)), rtol=1e-4)
    x = _items(H5ImageDataset(s, s.train))
    assert x.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.02
    # a sample of the training split (the default) is still roughly centred
    s = _setup(tmp_path, path, log1p=True, clip=[0, 2], stats_samples=20)
    assert _items(H5ImageDataset(s, s.train)).mean(dim=(0, 2, 3)).abs().max() < 0.2


def test_setup_carries_the_transforms_for_inference(tmp_path):
    s = _setup(tmp_path, _file(tmp_path), zero_suppress=0.01, clip=[0, 2], log1p=True, resize=[8, 8],
               resize_mode="avgpool", flip_augment=True, cache="memory")
    d = s.to_dict()
    assert DataSetup(**d) == s
    model_data = {k: v for k, v in d.items() if k not in ("train", "val", "test")}  # what a checkpoint keeps
    j = s.val[0]
    with h5py.File(s.path, "r") as f:
        x = preprocess(to_chw(f["X_jets"][j : j + 1], s.layout), model_data)
    assert torch.equal(torch.from_numpy(x[0]), H5ImageDataset(s, s.val)[0][0])
    assert "log1p" in s.summary() and "avgpool 16x16->8x8" in s.summary()


@pytest.mark.parametrize("data,key,words", [
    ({"clip": [2, 1]}, "data.clip", "low < high"),
    ({"clip": [1, 1]}, "data.clip", "low < high"),
    ({"clip": [1]}, "data.clip", "[low, high]"),
    ({"resize": [0, 8]}, "data.resize", "positive"),
    ({"resize": [8, -2]}, "data.resize", "positive"),
    ({"resize": [8]}, "data.resize", "[H, W]"),
    ({"resize_mode": "bilinear"}, "data.resize_mode", "crop"),
    ({"zero_suppress": -1}, "data.zero_suppress", "greater than or equal to 0"),
    ({"cache": "disk"}, "data.cache", "memory"),
    ({"log1p": "maybe"}, "data.log1p", "bool"),
])
def test_bad_values_name_the_key(tmp_path, data, key, words):
    path = _file(tmp_path)
    with pytest.raises(UserError) as e:
        validate(base_config(tmp_path, path, data={"path": str(path), **data}), source="t.yaml")
    assert e.value.key == key and words in e.value.message, str(e.value)


@pytest.mark.parametrize("mode,size", [("crop", [20, 8]), ("crop", [8, 17]), ("avgpool", [32, 32])])
def test_resize_larger_than_the_image_names_the_key(tmp_path, mode, size):
    with pytest.raises(UserError) as e:
        _setup(tmp_path, _file(tmp_path, size=16), resize=size, resize_mode=mode)
    assert e.value.key == "data.resize" and "larger than the images (16x16)" in e.value.message
    assert "pad_crop" in e.value.message


def test_memory_cache_too_big_for_the_machine(tmp_path, monkeypatch):
    import trainables.data.images as images

    path = _file(tmp_path)
    s = _setup(tmp_path, path, cache="memory")
    monkeypatch.setattr(images, "available_memory", lambda: 10_000)  # the check before Ray starts and the trial's
    for build in (lambda: _setup(tmp_path, path, cache="memory"), lambda: H5ImageDataset(s, s.train)):
        with pytest.raises(UserError) as e:
            build()
        assert e.value.key == "data.cache" and "data.cache: none" in e.value.message
    _setup(tmp_path, path)  # cache: none does not need the memory
