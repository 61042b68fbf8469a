"""Real files of every awkward kind, written by the tests themselves."""
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def png_bomb(path: Path, side: int = 20000, height: int = 0) -> Path:
    """A valid 1-bit PNG of side x side pixels (400 M pixels for 20000; ``height`` rows when given) that
    compresses to a few kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)
    height = height or side
    row = b'\x00' + b'\x00' * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b''.join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack('>IIBBBBB', side, height, 1, 0, 0, 0, 0)
    path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b''))
    return path


def write_all(folder: Path, source_jpeg: Path) -> dict:
    """name -> path for every bad or unusual input the app must handle."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    files['text_as_png'] = folder / 'notes.png'
    files['text_as_png'].write_text('this is not an image\n')
    files['empty'] = folder / 'empty.jpg'
    files['empty'].write_bytes(b'')
    data = source_jpeg.read_bytes()
    files['truncated_jpeg'] = folder / 'truncated.jpg'
    files['truncated_jpeg'].write_bytes(data[: len(data) // 2])
    files['bomb'] = png_bomb(folder / 'bomb.png')
    # over the app's own pixel limit (MAX_PIXELS, 50 M) and under Pillow's (about 89.5 M): only the app refuses it
    files['over_app_limit'] = png_bomb(folder / 'large.png', *OVER_APP_LIMIT)
    rgb = Image.open(source_jpeg).convert('RGB').resize((64, 48))
    gradient = (np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)
    files['16bit'] = folder / 'deep.png'
    Image.fromarray(gradient).save(files['16bit'])
    files['cmyk'] = folder / 'cmyk.jpg'
    rgb.convert('CMYK').save(files['cmyk'])
    files['rgba'] = folder / 'alpha.png'
    rgba = rgb.convert('RGBA')
    rgba.putalpha(128)
    rgba.save(files['rgba'])
    files['grayscale'] = folder / 'gray.png'
    rgb.convert('L').save(files['grayscale'])
    files['animated'] = folder / 'anim.gif'
    frames = [rgb.convert('P'), rgb.rotate(90).convert('P'), rgb.rotate(180).convert('P')]
    frames[0].save(files['animated'], save_all=True, append_images=frames[1:], duration=100, loop=0)
    files['tiny'] = folder / 'one.png'
    Image.new('RGB', (1, 1), (200, 30, 30)).save(files['tiny'])
    return files


OVER_APP_LIMIT = (8000, 7000)  # 56 M pixels
REJECTED = {
    'text_as_png': 'not an image file',
    'empty': 'empty (0 bytes)',
    'truncated_jpeg': 'truncated or corrupt',
    'bomb': 'decompression-bomb',
    'over_app_limit': 'large.png is 8000x7000 = 56,000,000 pixels, over the 50,000,000-pixel limit',
}
ACCEPTED = {
    '16bit': 'high bit depth',
    'cmyk': 'CMYK',
    'rgba': 'transparent',
    'grayscale': 'grayscale',
    'animated': 'first frame',
    'tiny': 'very small',
}
