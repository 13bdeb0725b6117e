"""Data sets for `resattn train` and `resattn eval`: digits, cifar10/cifar100,
imagefolder, synthetic.

Every data set yields ``(image, label)`` with ``image`` a normalised float32 (3, S, S)
tensor (S = the model's input size) and ``label`` an int. Images are decoded with
``torchvision.io`` and augmented with ``torchvision.transforms.v2``; the image folders are
scanned with torchvision's ``DatasetFolder`` helpers. Training augmentation is drawn from
the CPU RNG seeded by ``(seed, epoch, index)`` (see :mod:`.augment` and
:meth:`AugmentedDataset.set_epoch`), so a given epoch sees the same augmented images
whatever the number of DataLoader workers or distributed ranks: this is what makes
``--resume`` and the DDP equivalence exact. Nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..errors import UsageError
from .augment import randaugment, run_seeded, seed_key

__all__ = ["DATASETS", "DataBundle", "load_data", "AugmentedDataset", "TensorImageDataset",
           "ImageFolderDataset", "IMAGENET_MEAN", "IMAGENET_STD", "UnreadableImageWarning",
           "read_image", "eval_transform"]

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "synthetic")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's own list (torchvision.datasets.folder.IMG_EXTENSIONS).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImageWarning(UserWarning):
    """An image of a data folder could not be decoded and was skipped."""


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
    """Base class: per-sample augmentation drawn from ``(seed, epoch, index)``.

    ``self.transform`` (a torchvision v2 transform on a (3, H, W) uint8 or float tensor,
    or None) runs with the CPU RNG seeded from those three numbers; the result is scaled
    to 0..1 and normalised with ``mean`` / ``std``.
    """

    def __init__(self, train: bool, seed: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.train = train
        self.seed = int(seed)
        self.epoch = 0
        self.transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.set_normalization(mean, std)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation of ``epoch``; call before creating the epoch's iterator
        (workers receive a copy of the data set when the iterator is created)."""
        self.epoch = int(epoch)

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Per-channel mean and std applied last (e.g. a checkpoint's, in `resattn eval`)."""
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32).view(3, 1, 1)

    def _augment(self, img: torch.Tensor, index: int) -> torch.Tensor:
        if self.transform is None:
            return img
        return run_seeded(self.transform, seed_key(self.seed, self.epoch, index), img)

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        img = img.float().div_(255.0) if img.dtype == torch.uint8 else img.float()
        return ((img - self.mean) / self.std).contiguous()

    def limit(self, n: Optional[int]) -> AugmentedDataset:
        """Keep only the first ``n`` samples (None: all); returns self."""
        raise NotImplementedError


def _tensor_transform(augment: str, size: int, randaugment_m: Optional[int]) -> Optional[Any]:
    from torchvision.transforms import v2

    ops: List[Any] = []
    if augment in ("crop-flip", "crop"):
        # Zero padding before the 0..1 -> normalised step: the paper's CIFAR augmentation.
        ops.append(v2.RandomCrop(size, padding=4, fill=0))
        if augment == "crop-flip":
            ops.append(v2.RandomHorizontalFlip())
    if randaugment_m is not None:
        ops.append(randaugment(randaugment_m))
    return v2.Compose(ops) if ops else None


class TensorImageDataset(AugmentedDataset):
    """Images held in memory (digits, CIFAR, synthetic).

    Args:
        images: (N, 3, S, S) uint8 (0..255) or float32 (0..1), NCHW contiguous.
        labels: (N,) int64.
        mean, std: per-channel normalisation applied after augmentation.
        augment: "crop-flip" (pad 4 with zeros + random S x S crop + horizontal flip, the
            paper's CIFAR augmentation: v2.RandomCrop + v2.RandomHorizontalFlip), "crop"
            (the same without the flip) or "none".
        randaugment_m: torchvision's RandAugment of this magnitude after the crop (None: off).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: Sequence[float],
                 std: Sequence[float], augment: str, train: bool, seed: int,
                 randaugment_m: Optional[int] = None) -> None:
        super().__init__(train, seed, mean, std)
        if augment not in ("crop-flip", "crop", "none"):
            raise ValueError(f"augment must be crop-flip, crop or none, got {augment!r}")
        self.images = images
        self.labels = labels
        self.augment = augment if train else "none"
        if train:
            self.transform = _tensor_transform(self.augment, int(images.shape[-1]), randaugment_m)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def limit(self, n: Optional[int]) -> TensorImageDataset:
        if n is not None:
            self.images, self.labels = self.images[:n], self.labels[:n]
        return self

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img = self._augment(self.images[index], index)
        return self._normalize(img), int(self.labels[index])


def read_image(path: str) -> torch.Tensor:
    """Decode an image file to a (3, H, W) uint8 RGB tensor.

    torchvision.io decodes JPEG, PNG, GIF and WebP (libjpeg-turbo / libpng, faster than
    PIL); the other formats an image folder may hold (BMP, PPM/PGM, TIFF) go through PIL,
    which torchvision.io does not replace for them. torchvision 0.29 deprecates its
    decoders in favour of TorchCodec (a package the GPU machines' stack does not carry):
    the warning is silenced here, and should a later torchvision drop them, PIL decodes
    every format. Raises OSError/RuntimeError/ValueError when the file cannot be decoded.
    """
    if path.lower().endswith((".jpg", ".jpeg", ".png", ".gif", ".webp")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                from torchvision.io import ImageReadMode, decode_image
            except ImportError:
                decode_image = None
            if decode_image is not None:
                try:
                    return decode_image(path, mode=ImageReadMode.RGB)
                except RuntimeError:
                    pass  # e.g. a PNG flavour libpng refuses: let PIL try before giving up
    from PIL import Image

    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def eval_transform(size: int) -> Any:
    """Validation geometry: resize the shorter side to ``size * 256 / 224`` (bilinear,
    antialiased) and take the centre ``size`` x ``size`` crop (v2.Resize + v2.CenterCrop)."""
    from torchvision.transforms import v2

    short = max(size, int(round(size * 256 / 224)))
    return v2.Compose([v2.Resize(short, antialias=True), v2.CenterCrop(size)])


def _folder_train_transform(size: int, randaugment_m: Optional[int], crop: bool = True) -> Any:
    from torchvision.transforms import v2

    # Random-resized crop (scale 0.08..1, aspect 3/4..4/3: the usual form of the paper's
    # scale and aspect-ratio augmentation) + horizontal flip; without it (--no-augment),
    # the validation geometry.
    ops: List[Any] = ([v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                                            antialias=True),
                       v2.RandomHorizontalFlip()] if crop else [eval_transform(size)])
    if randaugment_m is not None:
        ops.append(randaugment(randaugment_m))
    return v2.Compose(ops)


class ImageFolderDataset(AugmentedDataset):
    """Images decoded from class folders (:func:`read_image`).

    Training: random-resized crop (scale 0.08..1, aspect 3/4..4/3) to ``size`` + flip
    (+ RandAugment when asked). Validation: :func:`eval_transform`.
    An image that cannot be decoded is skipped with an :class:`UnreadableImageWarning`
    naming it, and the next readable image of the folder list takes its place, so batches
    keep their size and distributed ranks stay in step.
    """

    def __init__(self, samples: List[Tuple[str, int]], size: int, mean: Sequence[float],
                 std: Sequence[float], train: bool, seed: int,
                 randaugment_m: Optional[int] = None) -> None:
        super().__init__(train, seed, mean, std)
        self.samples = samples
        self.size = int(size)
        self.augment = "resized-crop-flip" if train else "none"
        self.randaugment_m = randaugment_m
        self.transform = _folder_train_transform(self.size, randaugment_m) if train else None
        self._eval = eval_transform(self.size)

    def __len__(self) -> int:
        return len(self.samples)

    def limit(self, n: Optional[int]) -> ImageFolderDataset:
        if n is not None:
            self.samples = self.samples[:n]
        return self

    def set_augment(self, on: bool) -> None:
        """Turn the random-resized crop and flip on or off (RandAugment stays as set)."""
        self.augment = "resized-crop-flip" if on and self.train else "none"
        use = self.train and (on or self.randaugment_m is not None)
        self.transform = (_folder_train_transform(self.size, self.randaugment_m, crop=on)
                          if use else None)

    def _decode(self, index: int) -> Tuple[torch.Tensor, int]:
        n = len(self.samples)
        for k in range(n):
            path, label = self.samples[(index + k) % n]
            try:
                return read_image(path), label
            except Exception as exc:  # any decoder failure means "unreadable"
                warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})",
                              UnreadableImageWarning, stacklevel=2)
        raise RuntimeError(f"no image of this data set could be read (first: {self.samples[index][0]})")

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        img, label = self._decode(index)
        if self.transform is not None:
            img = self._augment(img, index)
        else:
            img = self._eval(img)
        return self._normalize(img), label


@dataclass
class _Options:
    """What every loader needs besides the data set's own arguments."""

    seed: int
    augment: bool
    randaugment_m: Optional[int]
    eval_only: bool  # `resattn eval`: the training set is not needed (left empty)
    classes: Optional[List[str]]  # the class list of a checkpoint (imagefolder, eval_only)


# ---------------------------------------------------------------------------------------
# digits


def _digits(image_size: int, opt: _Options) -> DataBundle:
    """sklearn's bundled 8x8 digits, held in memory (no torchvision data set has them)."""
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
    train = TensorImageDataset(xtr, y[idx_tr], mean, std, "none", True, opt.seed, opt.randaugment_m)
    val = TensorImageDataset(x[idx_va], y[idx_va], mean, std, "none", False, opt.seed)
    return DataBundle("digits", train, val, 10, [str(i) for i in range(10)], mean, std, image_size)


# ---------------------------------------------------------------------------------------
# cifar (torchvision's on-disk pickle format)
#
# Read here rather than with torchvision.datasets.CIFAR10/100, which do not fit: they
# unpickle the batch files with plain pickle (a tampered file runs code; this reader
# accepts arrays and lists only), refuse any file whose MD5 differs from the official
# archive's (so no subset or re-packed copy), and hand out PIL images one at a time; here
# the whole set is one uint8 tensor that the v2 transforms take directly.


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


def _cifar(name: str, data_dir: Optional[str], image_size: int, opt: _Options) -> DataBundle:
    if name == "cifar10":
        root = _find_dir(data_dir, "cifar-10-batches-py", name)
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        test_files, label_key, meta_file, names_key = ["test_batch"], "labels", "batches.meta", "label_names"
    else:
        root = _find_dir(data_dir, "cifar-100-python", name)
        train_files, test_files = ["train"], ["test"]
        label_key, meta_file, names_key = "fine_labels", "meta", "fine_label_names"
    if opt.eval_only:  # the checkpoint brings the training set's mean and std
        train_files = []
    for f in train_files + test_files:
        if not os.path.isfile(os.path.join(root, f)):
            raise UsageError(f"--data-dir: {os.path.join(root, f)} is missing (incomplete {name} download?)")
    parts = [_cifar_arrays(os.path.join(root, f), label_key) for f in train_files] or \
        [(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64))]
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
    train = TensorImageDataset(xtr, ytr, mean, std, "crop-flip" if opt.augment else "none", True,
                               opt.seed, opt.randaugment_m)
    val = TensorImageDataset(xva, yva, mean, std, "none", False, opt.seed)
    return DataBundle(name, train, val, num_classes, classes, mean, std, image_size)


# ---------------------------------------------------------------------------------------
# imagefolder


def _scan(folder: str, classes: Optional[List[str]]) -> Tuple[List[str], List[Tuple[str, int]]]:
    """Class folders and (path, class index) samples of ``folder`` with torchvision's
    find_classes / DatasetFolder.make_dataset (sorted, the IMG_EXTENSIONS list). With
    ``classes`` given (the training set's), a folder of another class is an error and a
    missing one is allowed (a validation set may lack some classes)."""
    from torchvision.datasets import DatasetFolder
    from torchvision.datasets.folder import find_classes

    try:
        found, _ = find_classes(folder)
    except FileNotFoundError:
        found = []
    if classes is None:
        classes = found
    index = {c: i for i, c in enumerate(classes)}
    for c in found:
        if c not in index:
            raise UsageError(f"--data-dir: class folder {os.path.join(folder, c)} has no "
                             "counterpart in train/")
    present = {c: index[c] for c in found}
    samples = DatasetFolder.make_dataset(folder, present, extensions=IMAGE_EXTENSIONS,
                                         allow_empty=True) if present else []
    return classes, [(p, int(i)) for p, i in samples]


def _imagefolder(data_dir: Optional[str], image_size: int, opt: _Options) -> DataBundle:
    if not data_dir:
        raise UsageError("--data imagefolder needs --data-dir (a folder with train/ and val/, "
                         "each holding one sub-folder of images per class)")
    if not os.path.isdir(data_dir):
        raise UsageError(f"--data-dir {data_dir}: no such directory")
    for sub in (("val",) if opt.eval_only and opt.classes else ("train", "val")):
        if not os.path.isdir(os.path.join(data_dir, sub)):
            raise UsageError(f"--data-dir {data_dir}: no {sub}/ folder (imagefolder needs train/ "
                             "and val/, each with one sub-folder of images per class)")
    if opt.eval_only and opt.classes:
        classes, train_samples = list(opt.classes), []
    else:
        classes, train_samples = _scan(os.path.join(data_dir, "train"), None)
    if not classes:
        raise UsageError(f"--data-dir: {os.path.join(data_dir, 'train')} has no class folders")
    if not train_samples and not opt.eval_only:
        raise UsageError(f"--data-dir: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
                         f"{os.path.join(data_dir, 'train')}")
    _, val_samples = _scan(os.path.join(data_dir, "val"), classes)
    if not val_samples:
        raise UsageError(f"--data-dir: no images under {os.path.join(data_dir, 'val')}")
    # ImageNet statistics: computing them over a large folder would take longer than a
    # short run, and they are what pretrained ImageNet networks use.
    train = ImageFolderDataset(train_samples, image_size, IMAGENET_MEAN, IMAGENET_STD, True,
                               opt.seed, opt.randaugment_m)
    if not opt.augment:
        train.set_augment(False)
    val = ImageFolderDataset(val_samples, image_size, IMAGENET_MEAN, IMAGENET_STD, False, opt.seed)
    return DataBundle("imagefolder", train, val, len(classes), classes, IMAGENET_MEAN,
                      IMAGENET_STD, image_size)


# ---------------------------------------------------------------------------------------
# synthetic


def _synthetic(image_size: int, num_classes: int, size: int, opt: _Options) -> DataBundle:
    g = torch.Generator().manual_seed(1234)
    n_val = max(1, size // 8)
    x = torch.randint(0, 256, (size + n_val, 3, image_size, image_size), generator=g, dtype=torch.uint8)
    y = torch.randint(0, num_classes, (size + n_val,), generator=g)
    mean, std = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
    train = TensorImageDataset(x[:size], y[:size], mean, std, "none", True, opt.seed,
                               opt.randaugment_m)
    val = TensorImageDataset(x[size:], y[size:], mean, std, "none", False, opt.seed)
    return DataBundle("synthetic", train, val, num_classes, [str(i) for i in range(num_classes)],
                      mean, std, image_size)


def load_data(name: str, *, data_dir: Optional[str], image_size: int, seed: int,
              synthetic_classes: int = 10, synthetic_size: int = 1024,
              train_subset: Optional[int] = None, val_subset: Optional[int] = None,
              augment: bool = True, randaugment_m: Optional[int] = None,
              eval_only: bool = False, classes: Optional[List[str]] = None) -> DataBundle:
    """Load data set ``name`` (one of DATASETS) for a model of ``image_size`` pixels.

    Args:
        augment: False turns the data set's crop/flip augmentation off.
        randaugment_m: add torchvision's RandAugment of this magnitude to training.
        eval_only: only the validation split is needed (`resattn eval`): the training set
            may be left empty and is not read where that saves time (cifar, imagefolder
            with ``classes``).
        classes: with eval_only, the class names of the checkpoint (imagefolder).
    Raises UsageError for a missing or malformed data directory.
    """
    opt = _Options(seed=seed, augment=augment, randaugment_m=randaugment_m, eval_only=eval_only,
                   classes=classes)
    loaders: Dict[str, Callable[[], DataBundle]] = {
        "digits": lambda: _digits(image_size, opt),
        "cifar10": lambda: _cifar("cifar10", data_dir, image_size, opt),
        "cifar100": lambda: _cifar("cifar100", data_dir, image_size, opt),
        "imagefolder": lambda: _imagefolder(data_dir, image_size, opt),
        "synthetic": lambda: _synthetic(image_size, synthetic_classes, synthetic_size, opt),
    }
    if name not in loaders:
        raise UsageError(f"--data {name!r}: choose one of {', '.join(DATASETS)}")
    bundle = loaders[name]()
    if not augment and isinstance(bundle.train, TensorImageDataset):
        bundle.train.augment = "none"
        bundle.train.transform = (_tensor_transform("none", image_size, randaugment_m)
                                  if bundle.train.train else None)
    bundle.train.limit(train_subset)
    bundle.val.limit(val_subset)
    if len(bundle.train) == 0 and not eval_only:
        raise UsageError(f"--data {name}: the training set is empty")
    if len(bundle.val) == 0:
        raise UsageError(f"--data {name}: the validation set is empty")
    return bundle
