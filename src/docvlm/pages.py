"""A page as docvlm reads it: decoded in full from a datasets image cell ({bytes, path}) or a file, checked (a
decompression bomb, a 1x1 placeholder, a strip) and converted to RGB. The row check before training, the training
batches and `docvlm predict` all read pages through `open_page`, so a page that passed one passes the others.
"""

from __future__ import annotations

import io
import os
import warnings

from docvlm.errors import UserError

MIN_SIDE = 8  # pixels: smaller is not a page (a 1x1 placeholder, a broken thumbnail)
MAX_ASPECT = 30  # a page 30x longer than wide is a strip or a broken scan, and resizes to nothing readable

# Why a page cannot be used: the reasons data_report.json groups skipped rows by.
IMAGE_MISSING = "image missing"
IMAGE_UNREADABLE = "image unreadable"
IMAGE_TOO_LARGE = "image too large to decode"
IMAGE_SHAPE = "image too small or too narrow"


class PageProblem(ValueError):
    """A page that cannot be used: `reason` (one of the constants above) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def open_page(stored, where: str):
    """A page from a datasets image cell ({bytes, path}) or a PIL image, decoded in full and converted to RGB;
    raises PageProblem saying what is wrong with it."""
    from PIL import Image

    if isinstance(stored, Image.Image):
        image = stored
    else:
        if not isinstance(stored, dict) or (stored.get("bytes") is None and not stored.get("path")):
            raise PageProblem(IMAGE_MISSING, "no image")
        source = io.BytesIO(stored["bytes"]) if stored.get("bytes") is not None else stored["path"]
        if isinstance(source, str):
            if not os.path.isfile(source):
                raise PageProblem(IMAGE_MISSING, f"image file '{source}' not found")
            if os.path.getsize(source) == 0:
                raise PageProblem(IMAGE_MISSING, f"image file '{source}' is empty (0 bytes)")
        try:
            with warnings.catch_warnings():
                # Pillow warns above MAX_IMAGE_PIXELS and raises at twice that: both are decompression bombs here
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(source)
                image.load()  # a truncated file fails here, not at open
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise PageProblem(IMAGE_TOO_LARGE, f"image too large to decode safely ({error})") from None
        except (OSError, SyntaxError, ValueError) as error:
            detail = f"image cannot be decoded ({type(error).__name__}: {error})"
            raise PageProblem(IMAGE_UNREADABLE, detail) from None
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise PageProblem(IMAGE_SHAPE, f"image is {width}x{height} pixels, below {MIN_SIDE} on a side")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise PageProblem(IMAGE_SHAPE, f"image is {width}x{height} pixels, more than {MAX_ASPECT}:1")
    return to_rgb(image, where)


def to_rgb(image, where: str):
    """Pages arrive as L, RGB, RGBA, P, CMYK...; the processor wants RGB. Transparency is laid on white paper."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise UserError(f"{where}: expected an image, got {type(image).__name__}. Check image_column.")
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit (I;16), 32-bit integer (I) and float (F) scans: Pillow's convert clips them at 255, which turns a
        # 16-bit page white. Scale them into 8 bits instead (16-bit range when the values exceed 8 bits).
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        brightest = float(values.max(initial=0))
        top = max(brightest, 1.0) if image.mode == "F" else 65535.0 if brightest > 255 else 255.0
        gray = np.clip(values * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA"):
        rgba = image.convert("RGBA")
        paper = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(paper, rgba).convert("RGB")
    return image.convert("RGB")


def undecoded_pages(rows):
    """The rows with their pages left as stored bytes/paths ({bytes, path}), for open_page to decode one by one:
    one bad page then fails its own row, not the whole batch it was fetched with."""
    from datasets import Image, LargeList, List

    feature = rows.features["image"]
    if isinstance(feature, Image):
        return rows.cast_column("image", Image(decode=False))
    if isinstance(feature, List | LargeList) and isinstance(feature.feature, Image):
        return rows.cast_column("image", List(Image(decode=False)))
    return rows


def pages_of(row: dict, where: str) -> list:
    """A row's pages as RGB images: `image` holds one page or a list of pages (a multi-page document), decoded or
    as stored ({bytes, path}, decoded here; docvlm.pages.PageProblem when one cannot be used)."""
    pages = row.get("image")
    pages = pages if isinstance(pages, list | tuple) else [pages]
    if not pages:
        raise UserError(f"{where}: no image. Check image_column.")
    return [open_page(page, where) if isinstance(page, dict) else to_rgb(page, where) for page in pages]
