"""Reading untrusted image files: every failure becomes an :class:`ImageInputError` naming the problem.

Decoding is guarded against decompression bombs (the pixel count is checked from the header, before any
pixel is decoded); unusual but valid images (16-bit, CMYK, alpha, palette, grayscale, animated, EXIF-rotated)
are turned into plain RGB with a note saying what was done.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ['ImageInputError', 'LoadedImage', 'load_image', 'MAX_PIXELS', 'MAX_BYTES']

MAX_PIXELS = 50_000_000  # ~7000 x 7000
MAX_BYTES = 50 * 1024 * 1024


class ImageInputError(ValueError):
    """The input is not an image this app can use; the message says why."""


@dataclass
class LoadedImage:
    image: Image.Image  # RGB
    notes: List[str] = field(default_factory=list)


def _to_rgb(img: Image.Image, notes: List[str]) -> Image.Image:
    mode = img.mode
    if mode in ('I;16', 'I;16B', 'I;16L', 'I', 'F'):
        arr = np.asarray(img, dtype=np.float64)
        low, high = float(arr.min()), float(arr.max())
        arr = (arr - low) / (high - low) * 255.0 if high > low else np.zeros_like(arr)
        notes.append(f'{mode} (high bit depth) image scaled to 8 bits')
        return Image.fromarray(arr.round().astype(np.uint8), 'L').convert('RGB')
    if mode == 'P' and 'transparency' in img.info:
        img, mode = img.convert('RGBA'), 'RGBA'
    if mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa'):
        background = Image.new('RGBA', img.size, (255, 255, 255, 255))
        notes.append('transparent pixels composited on white')
        return Image.alpha_composite(background, img.convert('RGBA')).convert('RGB')
    if mode == 'CMYK':
        notes.append('CMYK image converted to RGB')
    elif mode in ('L', '1'):
        notes.append('grayscale image replicated to 3 channels')
    return img.convert('RGB')


def load_image(path: Optional[str], max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES) -> LoadedImage:
    """Open ``path`` safely and return it as RGB, or raise :class:`ImageInputError`."""
    if not path:
        raise ImageInputError('no image given: upload, paste or capture an image first')
    if not os.path.isfile(path):
        raise ImageInputError(f'image file not found: {os.path.basename(path)}')
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if size == 0:
        raise ImageInputError(f'{name} is empty (0 bytes)')
    if size > max_bytes:
        raise ImageInputError(f'{name} is {size / 2**20:.0f} MiB; the limit is {max_bytes / 2**20:.0f} MiB')
    notes: List[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageInputError(
                        f'{name} is {width}x{height} = {width * height:,} pixels, over the {max_pixels:,}-pixel '
                        'limit (decompression-bomb guard); downscale it first')
                if width < 1 or height < 1:
                    raise ImageInputError(f'{name} has no pixels ({width}x{height})')
                frames = getattr(img, 'n_frames', 1)
                if frames > 1:
                    img.seek(0)
                    notes.append(f'animated image with {frames} frames: using the first frame')
                img.load()
                rotated = ImageOps.exif_transpose(img)
                if rotated is not img and rotated.size != img.size:
                    notes.append('rotated according to its EXIF orientation')
                rgb = _to_rgb(rotated, notes)
    except ImageInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageInputError(f'{name} is over the pixel limit (decompression-bomb guard): {e}') from None
    except UnidentifiedImageError:
        raise ImageInputError(f'{name} is not an image file this app can read (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)') \
            from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageInputError(f'{name} is truncated or corrupt: {e}') from None
    if min(width, height) < 8:
        notes.append(f'very small image ({width}x{height}): it is upsampled to the model input')
    return LoadedImage(rgb, notes)
