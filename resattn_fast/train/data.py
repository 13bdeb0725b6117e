"""Data sets for `resattn train`: digits, cifar10/cifar100, imagefolder, synthetic.

Every data set yields ``(image, label)`` with ``image`` a normalised float32 (3, S, S)
tensor (S = the model's input size) and ``label`` an int. Training augmentation is drawn
from a generator seeded by ``(seed, epoch, index)`` (see :meth:`AugmentedDataset.set_epoch`),
so a given epoch sees the same augmented images whatever the number of DataLoader
workers or distributed ranks: this is what makes ``--resume`` and the DDP equivalence
exact. Nothing here needs torchvision, and nothing is downloaded.
"""

from __future__ import annotations

import io
import math
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UsageError

__all__ = ["DATASETS", "DataBundle", "load_data", "AugmentedDataset", "TensorImageDataset",
           "ImageFolderDataset", "IMAGENET_MEAN", "IMAGENET_STD"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class DataBundle:
    """A training and a validation set and what a checkpoint must remember about them."""

    name: str
    train: AugmentedDataset
    val: AugmentedDataset
    num_classes: int
    classes: List[str]
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    image_size: int

    def info(self) -> dict:
        """Plain-data description stored in config.json and in checkpoints."""
        return {"name": self.name, "num_classes": self.num_classes, "classes": list(self.classes),
                "mean": list(self.mean), "std": list(self.std), "image_size": self.image_size,
                "train_size": len(self.train), "val_size": len(self.val)}


class AugmentedDataset(Dataset):
    """Base class: per-sample augmentation drawn from ``(seed, epoch, index)``."""

    def __init__(self, train: bool, seed: int) -> None:
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; call before creating the epoch's iterator
        (workers receive a copy of the data set when the iterator is created)."""
        self.epoch = int(epoch)

    def _generator(self, index: int) -> torch.Generator:
        # A fixed mixing of (seed, epoch, index) into one 63-bit seed: no global RNG state.
        key = (self.seed * 1_000_003 + self.epoch) * 2_147_483_647 + index
        g = torch.Generator()
        g.manual_seed(key % (2**63 - 1))
        return g

    def limit(self, n: Optional[int]) -> AugmentedDataset:
        """Keep only the first ``n`` samples (None: all); returns self."""
        raise NotImplementedError


class TensorImageDataset(AugmentedDataset):
    """Images held in memory.

    Args:
        images: (N, 3, S, S) uint8 (0..255) or float32 (0..1), NCHW contiguous.
        labels: (N,) int64.
        mean, std: per-channel normalisation applied after augmentation.
        augment: "crop-flip" (pad 4 with zeros + random S x S crop + horizontal flip, the
            paper's CIFAR augmentation), "crop" (the same without the flip) or "none".
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: str, train: bool, seed: int) -> None:
        super().__init__(train, seed)
        if augment not in ("crop-flip", "crop", "none"):
            raise ValueError(f"augment must be crop-flip, crop or none, got {augment!r}")
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.augment = augment if train else "none"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def limit(self, n: Optional[int]) -> TensorImageDataset:
        if n is not None:
            self.images, self.labels = self.images[:n], self.labels[:n]
        return self

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = self.images[index]
        img = img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
        if self.augment != "none":
            g = self._generator(index)
            pad = 4
            dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            flip = self.augment == "crop-flip" and bool(torch.randint(0, 2, (1,), generator=g))
            img = F.pad(img, (pad, pad, pad, pad))[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
            if flip:
                img = img.flip(2)
        return ((img - self.mean) / self.std).contiguous(), int(self.labels[index])


class ImageFolderDataset(AugmentedDataset):
    """Images read with PIL from class folders.

    Training: random-resized crop (scale 0.08..1, aspect 3/4..4/3, the usual form of the
    paper's scale and aspect-ratio augmentation) to ``size`` + horizontal flip.
    Validation: resize the shorter side to ``size * 256 / 224`` + centre crop ``size``.
    """

    def __init__(self, samples: List[Tuple[str, int]], size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, seed: int) -> None:
        super().__init__(train, seed)
        self.samples = samples
        self.size = int(size)
        self.augment = "resized-crop-flip" if train else "none"
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.samples)

    def limit(self, n: Optional[int]) -> ImageFolderDataset:
        if n is not None:
            self.samples = self.samples[:n]
        return self

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB")
        except Exception as exc:  # a broken file must not kill a days-long run silently
            raise RuntimeError(f"cannot read image {path}: {exc}") from exc
        if self.augment != "none":
            im = _random_resized_crop(im, self.size, self._generator(index))
        else:
            im = _resize_center_crop(im, self.size)
        return pil_to_tensor(im, self.mean, self.std), label


def pil_to_tensor(im: Any, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """PIL RGB image -> normalised float32 (3, H, W)."""
    arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)
    return ((t - mean) / std).contiguous()


def _resize_center_crop(im: Any, size: int) -> Any:
    from PIL import Image

    short = max(size, int(round(size * 256 / 224)))
    w, h = im.size
    scale = short / min(w, h)
    nw, nh = max(size, int(round(w * scale))), max(size, int(round(h * scale)))
    im = im.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return im.crop((left, top, left + size, top + size))


def _random_resized_crop(im: Any, size: int, g: torch.Generator) -> Any:
    from PIL import Image

    w, h = im.size
    area = w * h
    u = torch.rand(10, 4, generator=g).tolist()
    flip = bool(torch.rand(1, generator=g) < 0.5)
    box = None
    for a, b, c, d in u:
        target = area * (0.08 + a * (1.0 - 0.08))
        ratio = math.exp(math.log(3 / 4) + b * (math.log(4 / 3) - math.log(3 / 4)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x0, y0 = int(c * (w - cw + 1)), int(d * (h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
            break
    if box is None:  # fall back to the centre square
        s = min(w, h)
        box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    im = im.resize((size, size), Image.BILINEAR, box=box)
    if flip:
        im = im.transpose(Image.FLIP_LEFT_RIGHT)
    return im


# ---------------------------------------------------------------------------------------
# digits


def _digits(image_size: int, seed: int) -> DataBundle:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)  # (1797, 8, 8) in 0..1
    y = torch.from_numpy(d.target.astype(np.int64))
    # Bilinear resize 8x8 -> S x S once, replicated to 3 channels.
    x = F.interpolate(x[:, None], size=(image_size, image_size), mode="bilinear",
                      align_corners=False).clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    # A fixed stratified 80/20 split, independent of --seed: the validation set is the
    # same in every run.
    idx_tr, idx_va = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0,
                                      stratify=d.target)
    idx_tr, idx_va = torch.from_numpy(np.sort(idx_tr)), torch.from_numpy(np.sort(idx_va))
    xtr = x[idx_tr]
    mean = tuple(float(v) for v in xtr.mean(dim=(0, 2, 3)))
    std = tuple(float(v) for v in xtr.std(dim=(0, 2, 3)))
    # No augmentation: the digits are centred and scaled alike, and in a 5-epoch run a
    # 56-layer network learns them much faster without (measured: train accuracy 0.52 vs
    # 0.38 after 2 epochs with pad-4 crops); the validation images are centred the same way.
    train = TensorImageDataset(xtr, y[idx_tr], mean, std, "none", True, seed)
    val = TensorImageDataset(x[idx_va], y[idx_va], mean, std, "none", False, seed)
    return DataBundle("digits", train, val, 10, [str(i) for i in range(10)], mean, std, image_size)


# ---------------------------------------------------------------------------------------
# cifar (torchvision's on-disk pickle format)


class _CifarUnpickler(pickle.Unpickler):
    """Only what a CIFAR batch holds: dicts, lists, bytes, str and numpy arrays. A pickle
    can run arbitrary code; this refuses anything else."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected object {module}.{name}")


def _read_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    except OSError as exc:
        raise UsageError(f"--data-dir: cannot read {path}: {exc.strerror or exc}") from None
    except Exception as exc:
        raise UsageError(f"--data-dir: {path} is not a CIFAR batch file ({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"--data-dir: {path} is not a CIFAR batch file (no dict inside)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_arrays(path: str, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    d = _read_pickle(path)
    if "data" not in d or label_key not in d:
        raise UsageError(f"--data-dir: {path} lacks the 'data' or '{label_key}' entry of a CIFAR batch")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise UsageError(f"--data-dir: {path} holds data of shape {data.shape} with {labels.shape[0]} "
                         "labels; a CIFAR batch holds (N, 3072) uint8 and N labels")
    x = torch.from_numpy(data.astype(np.uint8).reshape(-1, 3, 32, 32).copy())
    return x, torch.from_numpy(labels)


def _find_dir(data_dir: Optional[str], sub: str, data: str) -> str:
    if not data_dir:
        raise UsageError(f"--data {data} needs --data-dir (the folder holding {sub}/, as torchvision "
                         "downloads it; nothing is downloaded here)")
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir}: no such directory")
    for cand in (os.path.join(data_dir, sub), data_dir):
        if os.path.isdir(cand) and os.path.basename(os.path.normpath(cand)) == sub:
            return cand
    raise UsageError(f"--data-dir {data_dir}: no {sub}/ folder inside (expected torchvision's "
                     f"{data} layout: {data_dir}/{sub}/...)")


def _cifar(name: str, data_dir: Optional[str], image_size: int, seed: int) -> DataBundle:
    if name == "cifar10":
        root = _find_dir(data_dir, "cifar-10-batches-py", name)
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta_file, names_key = ["test_batch"], "labels", "batches.meta", "label_names"
    else:
        root = _find_dir(data_dir, "cifar-100-python", name)
        train_files, test_files = ["train"], ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    for f in train_files + test_files:
        if not os.path.isfile(os.path.join(root, f)):
            raise UsageError(f"--data-dir: {os.path.join(root, f)} is missing (incomplete {name} download?)")
    parts = [_cifar_arrays(os.path.join(root, f), label_key) for f in train_files]
    xtr, ytr = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    parts = [_cifar_arrays(os.path.join(root, f), label_key) for f in test_files]
    xva, yva = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    num_classes = 10 if name == "cifar10" else 100
    for y, what in ((ytr, "training"), (yva, "test")):
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise UsageError(f"--data-dir: {name} {what} labels outside 0..{num_classes - 1}")
    classes = [str(i) for i in range(num_classes)]
    meta = os.path.join(root, meta_file)
    if os.path.isfile(meta):
        names = _read_pickle(meta).get(names_key)
        if isinstance(names, list) and len(names) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    if image_size != 32:
        raise UsageError(f"--data {name} has 32x32 images; pick a *_cifar model (this one expects "
                         f"{image_size}x{image_size})")
    # Per-channel statistics of the training images (the paper's normalisation), in
    # chunks to keep memory flat.
    s = torch.zeros(3, dtype=torch.float64)
    ss = torch.zeros(3, dtype=torch.float64)
    for chunk in xtr.split(5000):
        c = chunk.double().div_(255.0)
        s += c.sum(dim=(0, 2, 3))
        ss += (c * c).sum(dim=(0, 2, 3))
    n = max(1, xtr.shape[0] * 32 * 32)
    mean_t = s / n
    std_t = (ss / n - mean_t**2).clamp_min(1e-12).sqrt()
    mean = tuple(float(v) for v in mean_t)
    std = tuple(float(v) for v in std_t)
    train = TensorImageDataset(xtr, ytr, mean, std, "crop-flip", True, seed)
    val = TensorImageDataset(xva, yva, mean, std, "none", False, seed)
    return DataBundle(name, train, val, num_classes, classes, mean, std, image_size)


# ---------------------------------------------------------------------------------------
# imagefolder


def _scan(folder: str, classes: Optional[List[str]]) -> Tuple[List[str], List[Tuple[str, int]]]:
    found = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    samples: List[Tuple[str, int]] = []
    for c in found:
        if c not in index:
            raise UsageError(f"--data-dir: class folder {os.path.join(folder, c)} has no "
                             "counterpart in train/")
        for root, _dirs, files in sorted(os.walk(os.path.join(folder, c))):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, f), index[c]))
    return classes, samples


def _imagefolder(data_dir: Optional[str], image_size: int, seed: int) -> DataBundle:
    if not data_dir:
        raise UsageError("--data imagefolder needs --data-dir (a folder with train/ and val/, "
                         "each holding one sub-folder of images per class)")
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir}: no such directory")
    for sub in ("train", "val"):
        if not os.path.isdir(os.path.join(data_dir, sub)):
            raise UsageError(f"--data-dir {data_dir}: no {sub}/ folder (imagefolder needs train/ "
                             "and val/, each with one sub-folder of images per class)")
    classes, train_samples = _scan(os.path.join(data_dir, "train"), None)
    if not classes:
        raise UsageError(f"--data-dir: {os.path.join(data_dir, 'train')} has no class folders")
    if not train_samples:
        raise UsageError(f"--data-dir: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                         f"{os.path.join(data_dir, 'train')}")
    _, val_samples = _scan(os.path.join(data_dir, "val"), classes)
    if not val_samples:
        raise UsageError(f"--data-dir: no images under {os.path.join(data_dir, 'val')}")
    # ImageNet statistics: computing them over a large folder would take longer than a
    # short run, and they are what pretrained ImageNet networks use.
    train = ImageFolderDataset(train_samples, image_size, IMAGENET_MEAN, IMAGENET_STD, True, seed)
    val = ImageFolderDataset(val_samples, image_size, IMAGENET_MEAN, IMAGENET_STD, False, seed)
    return DataBundle("imagefolder", train, val, len(classes), classes, IMAGENET_MEAN,
                      IMAGENET_STD, image_size)


# ---------------------------------------------------------------------------------------
# synthetic


def _synthetic(image_size: int, num_classes: int, size: int, seed: int) -> DataBundle:
    g = torch.Generator().manual_seed(1234)
    n_val = max(1, size // 8)
    x = torch.randint(0, 256, (size + n_val, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (size + n_val,), generator=g)
    mean, std = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
    train = TensorImageDataset(x[:size], y[:size], mean, std, "none", True, seed)
    val = TensorImageDataset(x[size:], y[size:], mean, std, "none", False, seed)
    return DataBundle("synthetic", train, val, num_classes, [str(i) for i in range(num_classes)],
                      mean, std, image_size)


def load_data(name: str, *, data_dir: Optional[str], image_size: int, seed: int,
              synthetic_classes: int = 10, synthetic_size: int = 1024,
              train_subset: Optional[int] = None, val_subset: Optional[int] = None,
              augment: bool = True) -> DataBundle:
    """Load data set ``name`` (one of DATASETS) for a model of ``image_size`` pixels.

    ``augment=False`` turns the training augmentation off. Raises UsageError for a missing
    or malformed data directory.
    """
    loaders: dict[str, Callable[[], DataBundle]] = {
        "digits": lambda: _digits(image_size, seed),
        "cifar10": lambda: _cifar("cifar10", data_dir, image_size, seed),
        "cifar100": lambda: _cifar("cifar100", data_dir, image_size, seed),
        "imagefolder": lambda: _imagefolder(data_dir, image_size, seed),
        "synthetic": lambda: _synthetic(image_size, synthetic_classes, synthetic_size, seed),
    }
    if name not in loaders:
        raise UsageError(f"--data {name!r}: choose one of {', '.join(DATASETS)}")
    bundle = loaders[name]()
    if not augment:
        bundle.train.augment = "none"
    bundle.train.limit(train_subset)
    bundle.val.limit(val_subset)
    if len(bundle.train) == 0:
        raise UsageError(f"--data {name}: the training set is empty")
    if len(bundle.val) == 0:
        raise UsageError(f"--data {name}: the validation set is empty")
    return bundle
