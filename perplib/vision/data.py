"""Image classification data for the vision track (paper Section 3.1, Appendix A.1).

Three sources, one interface (:class:`VisionData`):

- ``"imagenet"`` (paper profile): an ``ImageFolder`` tree ``<root>/train/<class>/*`` and
  ``<root>/val/<class>/*`` with the standard transforms (random-resized crop 224 + flip for
  training, resize 256 + center crop 224 for evaluation). The official validation set is the test
  set, as in the paper.
- ``"fashion-mnist"`` (embedded profile): the four IDX files shipped by Debian's
  ``dataset-fashion-mnist`` package under ``/usr/share/datasets/fashion-mnist``.
- ``"digits"``: scikit-learn's 8x8 digits, always available offline (the fallback).

Every source holds out 10% of its training set for validation, with a seeded permutation.
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("digits", "fashion-mnist", "imagenet")
FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class VisionData:
    """Train / validation / test splits of one dataset plus what a model needs to know about it.

    ``train``, ``val`` and ``test`` are either ``(images, labels)`` tensor pairs (small datasets,
    held in memory, already normalised) or torch ``Dataset`` objects (ImageFolder).
    """

    name: str
    train: object
    val: object
    test: object
    num_classes: int
    in_channels: int
    image_size: int
    num_workers: int = 0

    def size(self, split: str) -> int:
        part = getattr(self, split)
        return len(part[1]) if isinstance(part, tuple) else len(part)

    def batches(
        self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0, limit: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` batches of a split; ``shuffle`` uses a generator seeded by ``seed``;
        ``limit`` stops after that many batches."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be one of ['train', 'val', 'test'], got {split!r}")
        part = getattr(self, split)
        gen = torch.Generator().manual_seed(seed)
        if isinstance(part, tuple):
            x, y = part
            order = torch.randperm(len(y), generator=gen) if shuffle else torch.arange(len(y))
            for i, start in enumerate(range(0, len(y), batch_size)):
                if limit is not None and i >= limit:
                    return
                idx = order[start : start + batch_size]
                yield x[idx], y[idx]
            return
        loader = torch.utils.data.DataLoader(
            part, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=self.num_workers
        )
        for i, batch in enumerate(loader):
            if limit is not None and i >= limit:
                return
            yield batch[0], batch[1]


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST / Fashion-MNIST format), gzipped or not, into a uint8 array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        blob = f.read()
    if len(blob) < 4 or blob[0] != 0 or blob[1] != 0 or blob[2] != 0x08:
        raise ValueError(f"'{path}' is not an unsigned-byte IDX file (bad magic number)")
    ndim = blob[3]
    dims = struct.unpack(f">{ndim}I", blob[4 : 4 + 4 * ndim])
    data = np.frombuffer(blob, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"'{path}' is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST folder '{root}' lacks '{stem}' (or '{stem}.gz'); it needs the four IDX files "
        f"{sorted(FASHION_MNIST_FILES.values())}. Install them with `apt-get install dataset-fashion-mnist` "
        "or use --data digits"
    )


def available(name: str, fallback: str | None = "digits", root: str | None = None) -> str:
    """The dataset to use: ``name`` when its files are present, else ``fallback`` with a warning
    saying so (the embedded profile runs on digits where Fashion-MNIST is not installed)."""
    if name not in DATASETS:
        raise ValueError(f"data must be one of {list(DATASETS)}, got {name!r}")
    if name == "digits":
        return name
    default = FASHION_MNIST_ROOT if name == "fashion-mnist" else None
    where = Path(root) if root else default
    if where is not None and where.is_dir():
        return name
    if fallback is None:
        return name  # loading will raise the precise error
    warnings.warn(
        f"dataset '{name}' not found at '{where}'; falling back to '{fallback}' "
        "(install `dataset-fashion-mnist` to run the embedded profile as designed)",
        stacklevel=2,
    )
    return fallback


def _split_val(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(n)`` into (train, val) index tensors, ``val_fraction`` of them held out."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * n))
    return perm[n_val:], perm[:n_val]


def _subset(x: torch.Tensor, y: torch.Tensor, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if limit is None or limit >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))[:limit]
    return x[idx], y[idx]


def _tensor_splits(x_train, y_train, x_test, y_test, *, val_fraction, seed, train_subset, test_subset):
    x_train, y_train = _subset(x_train, y_train, train_subset, seed)
    x_test, y_test = _subset(x_test, y_test, test_subset, seed)
    tr, va = _split_val(len(y_train), val_fraction, seed)
    # Normalise with training-split statistics (per channel).
    mean = x_train[tr].mean(dim=(0, 2, 3), keepdim=True)
    std = x_train[tr].std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    norm = lambda t: ((t - mean) / std).contiguous()  # noqa: E731
    return (norm(x_train[tr]), y_train[tr]), (norm(x_train[va]), y_train[va]), (norm(x_test), y_test)


def load_vision_data(
    name: str,
    root: str | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    train_subset: int | None = None,
    test_subset: int | None = None,
    num_workers: int = 0,
) -> VisionData:
    """Load a dataset's train / val / test splits (10% of train held out for validation, seeded).

    ``train_subset`` / ``test_subset`` cap the number of images (seeded choice), the embedded
    profile's way to scale the experiment to a laptop. Bad folders fail early, naming the path.
    """
    if name not in DATASETS:
        raise ValueError(f"data must be one of {list(DATASETS)}, got {name!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        # digits has no test split: a fixed, seeded 20% of it is the test set.
        rest, test = _split_val(len(y), 0.2, seed=1234)
        splits = _tensor_splits(
            x[rest], y[rest], x[test], y[test],
            val_fraction=val_fraction, seed=seed, train_subset=train_subset, test_subset=test_subset,
        )  # fmt: skip
        return VisionData(name, *splits, num_classes=10, in_channels=1, image_size=8)
    if name == "fashion-mnist":
        folder = Path(root) if root else FASHION_MNIST_ROOT
        if not folder.is_dir():
            raise FileNotFoundError(
                f"Fashion-MNIST folder '{folder}' does not exist; install Debian's `dataset-fashion-mnist` "
                "(apt-get install dataset-fashion-mnist), pass the folder holding the IDX files, or use --data digits"
            )
        arrays = {key: read_idx(_find_idx(folder, stem)) for key, stem in FASHION_MNIST_FILES.items()}
        for part in ("train", "test"):
            n_img, n_lab = len(arrays[f"{part}_images"]), len(arrays[f"{part}_labels"])
            if arrays[f"{part}_images"].ndim != 3 or n_img != n_lab:
                raise ValueError(
                    f"Fashion-MNIST {part} files in '{folder}' are malformed: {n_img} images, {n_lab} labels"
                )
        to_x = lambda a: torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)  # noqa: E731
        to_y = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
        splits = _tensor_splits(
            to_x(arrays["train_images"]), to_y(arrays["train_labels"]),
            to_x(arrays["test_images"]), to_y(arrays["test_labels"]),
            val_fraction=val_fraction, seed=seed, train_subset=train_subset, test_subset=test_subset,
        )  # fmt: skip
        return VisionData(name, *splits, num_classes=10, in_channels=1, image_size=28)
    return _imagenet(root, val_fraction=val_fraction, seed=seed, train_subset=train_subset,
                     test_subset=test_subset, num_workers=num_workers)  # fmt: skip


def check_image_folder(path: Path) -> list[str]:
    """The class names of an ImageFolder tree, or a clear error when it is missing or empty."""
    if not path.is_dir():
        raise FileNotFoundError(f"image folder '{path}' does not exist")
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder '{path}' has no classes: expected one subfolder of images per class")
    return classes


def _imagenet(root, *, val_fraction, seed, train_subset, test_subset, num_workers) -> VisionData:
    from torchvision import datasets, transforms

    if not root:
        raise ValueError("data 'imagenet' needs a root folder holding train/<class>/ and val/<class>/ (--data-root)")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise FileNotFoundError(f"ImageNet folder '{base}' does not exist")
    train_classes = check_image_folder(base / "train")
    val_classes = check_image_folder(base / "val")
    if train_classes != val_classes:
        raise ValueError(
            f"'{base}/train' and '{base}/val' must hold the same class folders "
            f"({len(train_classes)} vs {len(val_classes)} classes)"
        )
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose(
        [transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    eval_tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), normalize])
    # Two views of the training folder: augmented for training, plain for the held-out 10%.
    train_all = datasets.ImageFolder(base / "train", transform=train_tf)
    train_plain = datasets.ImageFolder(base / "train", transform=eval_tf)
    test = datasets.ImageFolder(base / "val", transform=eval_tf)
    n = len(train_all) if train_subset is None else min(train_subset, len(train_all))
    pool = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(seed + 1))[:n]
    tr, va = _split_val(n, val_fraction, seed)
    if test_subset is not None and test_subset < len(test):
        keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed + 1))[:test_subset]
        test = torch.utils.data.Subset(test, keep.tolist())
    return VisionData(
        "imagenet",
        torch.utils.data.Subset(train_all, pool[tr].tolist()),
        torch.utils.data.Subset(train_plain, pool[va].tolist()),
        test,
        num_classes=len(train_classes),
        in_channels=3,
        image_size=224,
        num_workers=num_workers,
    )
