"""Datasets for uptraining and evaluation: train / val / test with the model's own preprocessing.

Sources: an ImageFolder directory (``train/<class>/...`` and optionally ``test/<class>/...``), a ``.tar.gz``
of one (extracted once into a cache folder), or a Hugging Face dataset repo (``cifar10``, ``food101``, any
``org/name`` with an image column and a class-label column) through the ``datasets`` library, map-style or
streamed (``streaming=True``: each process reads only its part of the stream,
``datasets.distributed.split_dataset_by_node``). The validation split is carved from train with a fixed seed,
so model selection never touches test.
"""
from __future__ import annotations

import copy
import hashlib
import itertools
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Subset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from ..io.preprocessing import eval_geometry, normalisation
from ..core.settings import Settings

__all__ = ['DataSplits', 'build_datasets', 'build_transform', 'extract_archive', 'DecodedImages', 'crop_flip',
           'AUGMENTATIONS', 'HUB_DATASETS', 'StreamedImages']

AUGMENTATIONS = ('none', 'crop-flip', 'randaugment')
HUB_DATASETS: Dict[str, Dict[str, str]] = {
    'cifar10': dict(image='img', label='label', test='test'),
    'cifar100': dict(image='img', label='fine_label', test='test'),
    'food101': dict(image='image', label='label', test='validation'),
    'zh-plus/tiny-imagenet': dict(image='image', label='label', test='valid'),
}


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Optional[Dataset]
    classes: List[str]
    train_eval: Optional[Dataset] = None  # the train split with the evaluation transform (calibration)

    def split(self, name: str) -> Dataset:
        """The ``'test'`` or ``'val'`` split; a ``ValueError`` when the data has no such split."""
        if name not in ('test', 'val'):
            raise ValueError(f'split must be test or val, got {name!r}')
        dataset = self.test if name == 'test' else self.val
        if dataset is None:
            raise ValueError(f'the data has no {name} split')
        return dataset

    def calibration(self, n: int, seed: int = 0) -> torch.Tensor:
        """``(n, 3, H, W)``: ``n`` training images (never val or test) drawn with ``seed``, preprocessed as at
        evaluation -- the calibration set of the head-order advisor."""
        source = self.train_eval if self.train_eval is not None else self.train
        if isinstance(source, IterableDataset):  # a stream has no random access: its first n rows
            return torch.stack([image for image, _ in itertools.islice(iter(source), n)])
        order = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:n].tolist()
        return torch.stack([source[i][0] for i in order])


def cache_root() -> Path:
    return Settings.from_env().cache


def extract_archive(archive: str | os.PathLike, cache_dir: Optional[Path] = None) -> Path:
    """Extract ``archive`` once (keyed by its size and name) and return the folder holding ``train/``."""
    archive = Path(archive)
    if not archive.is_file():
        raise FileNotFoundError(f'dataset archive not found: {archive}')
    key = hashlib.sha1(f'{archive.name}:{archive.stat().st_size}'.encode()).hexdigest()[:12]
    target = (cache_dir or cache_root() / 'datasets') / f'{archive.name.split(".")[0]}-{key}'
    done = target / '.extracted'
    if not done.exists():
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(target, filter='data')
        done.touch()
    for candidate in [target, *sorted(p for p in target.iterdir() if p.is_dir())]:
        if (candidate / 'train').is_dir():
            return candidate
    raise ValueError(f'{archive}: no train/ folder inside the archive')


def build_transform(preprocessing: Dict[str, Any], training: bool, augment: str = 'crop-flip') -> Callable:
    """The checkpoint's preprocessing (input size, interpolation, mean/std, crop_pct) plus train augmentation."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f'augment must be one of {AUGMENTATIONS}, got {augment!r}')
    if training and augment != 'none':
        size = tuple(preprocessing['input_size'][-2:])
        interpolation = T.InterpolationMode(preprocessing.get('interpolation', 'bicubic'))
        steps: List[Callable] = [T.Resize(size, interpolation=interpolation),
                                 T.RandomCrop(size, padding=max(1, size[0] // 8), padding_mode='reflect'),
                                 T.RandomHorizontalFlip()]
        if augment == 'randaugment':
            steps.append(T.RandAugment())
        return T.Compose([*steps, normalisation(preprocessing)])
    return T.Compose([eval_geometry(preprocessing), normalisation(preprocessing)])


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """The batched form of ``RandomCrop(size, padding, padding_mode='reflect')`` + ``RandomHorizontalFlip``:
    ``images`` ``(B, C, H, W)``, ``offsets`` ``(B, 2)`` the crop's top-left corner in the padded image
    (0..2 * padding), ``flips`` ``(B,)`` bool. One gather for the whole batch, no loop over images."""
    B, C, H, W = images.shape
    padded = F.pad(images.float(), (padding,) * 4, mode='reflect').to(images.dtype)
    rows = offsets[:, 0, None] + torch.arange(H)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(W)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(-1), cols)
    batch = torch.arange(B)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


class DecodedImages(Dataset):
    """A split decoded once into one uint8 tensor ``(N, 3, H, W)`` at the input size, so an epoch decodes no
    JPEG; :meth:`collate` runs the random crop + flip (``crop-flip``) or nothing (``none``) on the whole batch
    and normalises it. The images it returns are what the per-image torchvision pipeline would return, pixel
    for pixel, for the same crop and flip (tests/test_train.py)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocessing: Dict[str, Any],
                 augment: str) -> None:
        if augment not in ('none', 'crop-flip'):
            raise ValueError(f'predecoded training data supports augment none or crop-flip, not {augment!r}')
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(preprocessing['mean'], dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(preprocessing['std'], dtype=torch.float32)[:, None, None]
        self.padding = max(1, images.shape[-2] // 8)

    @classmethod
    def decode(cls, source: Dataset, preprocessing: Dict[str, Any], augment: str) -> 'DecodedImages':
        """Decode every image of ``source`` (yielding PIL images and labels) resized to the input size, as the
        training pipeline's first step does."""
        size = tuple(preprocessing['input_size'][-2:])
        resize = T.Resize(size, interpolation=T.InterpolationMode(preprocessing.get('interpolation', 'bicubic')))
        images = torch.empty(len(source), 3, *size, dtype=torch.uint8)
        labels = torch.empty(len(source), dtype=torch.long)
        for i in range(len(source)):
            image, label = source[i]
            images[i] = T.functional.pil_to_tensor(resize(image))
            labels[i] = label
        return cls(images, labels, preprocessing, augment)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]

    def collate(self, batch: List[tuple]) -> tuple:
        images = torch.stack([b[0] for b in batch])
        labels = torch.stack([b[1] for b in batch])
        if self.augment == 'crop-flip':
            offsets = torch.randint(0, 2 * self.padding + 1, (len(batch), 2))
            flips = torch.rand(len(batch)) < 0.5
            images = crop_flip(images, offsets, flips, self.padding)
        return (images.float() / 255 - self.mean) / self.std, labels


def _rgb_loader(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert('RGB')


class StreamedImages(IterableDataset):
    """One process's part of a streamed Hub split (``split_dataset_by_node``), as ``(image, label)`` pairs: no
    two processes read the same row and together they read every row once, so a data-parallel pass over it
    needs no padding (and ``accelerate`` must not shard it again). ``limit`` caps the rows of the whole split
    before it is divided, so one process or several count the same images."""

    def __init__(self, rows: Any, image_key: str, label_key: str, transform: Callable, limit: Optional[int],
                 node: Tuple[int, int]) -> None:
        from datasets.distributed import split_dataset_by_node
        rows = rows.take(limit) if limit is not None else rows
        self.rows = split_dataset_by_node(rows, rank=node[0], world_size=node[1])
        self.image_key, self.label_key, self.transform = image_key, label_key, transform

    def __iter__(self):
        for row in self.rows:
            image = row[self.image_key].convert('RGB')
            yield self.transform(image) if self.transform is not None else image, int(row[self.label_key])


class _HubImages(Dataset):
    def __init__(self, rows: Any, image_key: str, label_key: str, transform: Callable) -> None:
        self.rows, self.image_key, self.label_key, self.transform = rows, image_key, label_key, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = self.rows[int(i)]
        image = row[self.image_key].convert('RGB')
        return self.transform(image) if self.transform is not None else image, int(row[self.label_key])


def _hub_dataset(source: str, streaming: bool) -> Tuple[Any, Dict[str, Optional[str]]]:
    """``source``'s splits through ``datasets.load_dataset`` and which columns and split to read: the known
    names' (:data:`HUB_DATASETS`), else the first image column, the first class-label column and the first of
    test / validation / valid the repo has."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f'loading {source!r} from the Hub needs `pip install datasets`') from None
    try:
        rows = datasets.load_dataset(source, streaming=streaming)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise ValueError(f'{source!r} is not a folder, an archive or a Hub dataset: {e}') from None
    if 'train' not in rows:
        raise ValueError(f'{source}: no train split (it has {sorted(rows)})')
    features = rows['train'].features
    spec: Dict[str, Optional[str]] = dict(HUB_DATASETS.get(source, {}))
    if not spec:
        spec['image'] = next((k for k, f in features.items() if isinstance(f, datasets.Image)), None)
        spec['label'] = next((k for k, f in features.items() if isinstance(f, datasets.ClassLabel)), None)
        spec['test'] = next((k for k in ('test', 'validation', 'valid') if k in rows), None)
        if spec['image'] is None or spec['label'] is None:
            raise ValueError(f'{source}: needs an image column and a class-label column, has {dict(features)}')
    return rows, spec


def _split_indices(n: int, val_fraction: float, seed: int) -> tuple:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = int(round(n * val_fraction))
    return sorted(order[n_val:]), sorted(order[:n_val])


def build_datasets(source: str, preprocessing: Dict[str, Any], *, augment: str = 'crop-flip',
                   val_fraction: float = 0.1, seed: int = 0, limit: Optional[int] = None,
                   predecode: bool = False, streaming: bool = False, node: Tuple[int, int] = (0, 1)) -> DataSplits:
    """Train / val / test splits of ``source``; ``limit`` caps each split (for smoke tests). ``predecode``
    decodes the training split once into memory (:class:`DecodedImages`; its loader needs its ``collate``).
    ``streaming`` (Hub datasets only): the test split is streamed, and only ``node = (rank, world_size)``'s part
    of it is read (:class:`StreamedImages`); val is ``None`` (a stream has no random access to carve it from)."""
    train_tf = build_transform(preprocessing, True, augment)
    eval_tf = build_transform(preprocessing, False)
    path = Path(source)
    if path.is_file() and source.endswith(('.tar.gz', '.tgz', '.tar')):
        path = extract_archive(path)
    if streaming and path.exists():
        raise ValueError(f'{source}: streaming reads Hub datasets; a folder or an archive is read directly')
    if path.is_dir():
        root = path / 'train' if (path / 'train').is_dir() else path
        train_full = ImageFolder(root, transform=train_tf, loader=_rgb_loader)
        val_full = ImageFolder(root, transform=eval_tf, loader=_rgb_loader)
        test = ImageFolder(path / 'test', transform=eval_tf, loader=_rgb_loader) if (path / 'test').is_dir() else None
        if test is not None and test.classes != train_full.classes:
            raise ValueError(f'{source}: train and test class folders differ')
        classes = train_full.classes
        n = len(train_full)
    else:
        rows, spec = _hub_dataset(source, streaming)
        classes = list(rows['train'].features[spec['label']].names)
        if streaming:  # test only (no random access to carve val); calibration reads train's first rows
            train_rows = StreamedImages(rows['train'], spec['image'], spec['label'], eval_tf, None, (0, 1))
            test = StreamedImages(rows[spec['test']], spec['image'], spec['label'], eval_tf, limit, node) \
                if spec['test'] else None
            return DataSplits(train_rows, None, test, classes, train_rows)
        train_full = _HubImages(rows['train'], spec['image'], spec['label'], train_tf)
        val_full = _HubImages(rows['train'], spec['image'], spec['label'], eval_tf)
        test = _HubImages(rows[spec['test']], spec['image'], spec['label'], eval_tf) if spec['test'] else None
        n = len(train_full)
    train_idx, val_idx = _split_indices(n, val_fraction, seed)
    if limit is not None:
        g = torch.Generator().manual_seed(seed + 1)
        train_idx = [train_idx[i] for i in torch.randperm(len(train_idx), generator=g)[:limit].tolist()]
        val_idx = [val_idx[i] for i in torch.randperm(len(val_idx), generator=g)[:limit].tolist()]
        if test is not None:
            test = Subset(test, torch.randperm(len(test), generator=g)[:limit].tolist())
    train: Dataset = Subset(train_full, train_idx)
    if predecode:
        raw = copy.copy(train_full)
        raw.transform = None
        train = DecodedImages.decode(Subset(raw, train_idx), preprocessing, augment)
    return DataSplits(train, Subset(val_full, val_idx), test, classes, Subset(val_full, train_idx))
