"""PDF pages as images (`llava ask report.pdf ...`, `/image report.pdf`), rendered with pypdfium2 (the `[pdf]` extra).

`is_pdf(name)` says whether an input is a PDF (by its `.pdf` extension); `pdf_pages(path, pages,
max_pixels)` renders the chosen pages and returns them as `ImageRef`s, with a note when only the
first page was taken because none were chosen. `pages` is `--pages`' text: `1-3,7` (1-based,
in the order given, each page once).

A PDF is hostile input like any image file:
- read through `safeio.read_regular` (regular files only, never blocking), at most MAX_PDF_BYTES;
- parsed by PDFium in memory, without its form environment (no JavaScript, no XFA);
- an encrypted (password-protected) or broken PDF, one of more than MAX_DOCUMENT_PAGES pages, a
  selection of more than MAX_PAGES pages, a page number out of range or a page of no size is one
  `InputError` line;
- each page is rendered at the DPI that makes its long side RENDER_SIDE pixels (the largest input
  any LLaVA family uses, so no model loses detail; between MIN_DPI and MAX_DPI), and then goes
  through media/images.py's size checks (`--max-image-pixels`, aspect ratio).
A page has no file of its own: a saved conversation records it by name (`report.pdf page 3`)
without a path, so, like a pasted image, it cannot be re-read on resume.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import TYPE_CHECKING

from llava_cli.base.errors import InputError, UsageError, one_line
from llava_cli.base.options import DEFAULT_MAX_IMAGE_PIXELS
from llava_cli.media.images import check_size, read_media_file, shrink_to_usable

if TYPE_CHECKING:
    from llava_cli.media.images import ImageRef

MAX_PDF_BYTES = 100 * 1024 * 1024
MAX_DOCUMENT_PAGES = 2000  # a longer document is a book: split it first
MAX_PAGES = 8  # pages per question: each is an image of hundreds to thousands of tokens
RENDER_SIDE = 2304  # pixels on a page's long side: OneVision's largest anyres grid
MIN_DPI, MAX_DPI = 36, 600
POINTS_PER_INCH = 72
PAGE_RANGE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
INSTALL_HINT = "reading PDFs needs pypdfium2: pip install 'llava-cli[pdf]'"


def is_pdf(name: str) -> bool:
    return PurePath(name).suffix.lower() == ".pdf"


def parse_pages(text: str) -> list[int]:
    """`1-3,7` -> [1, 2, 3, 7] (1-based, each page once, in the order given); `UsageError` otherwise."""
    pages: list[int] = []
    for part in text.split(","):
        match = PAGE_RANGE.match(part)
        if not match:
            raise UsageError(f"--pages takes page numbers and ranges such as 1-3,7 (got {text!r})")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if first < 1 or last < first:
            raise UsageError(f"--pages: {part.strip()} is no range of pages (pages count from 1)")
        if last - first >= MAX_PAGES:
            raise UsageError(f"--pages selects at most {MAX_PAGES} pages per question (got {part.strip()})")
        pages += [page for page in range(first, last + 1) if page not in pages]
    if len(pages) > MAX_PAGES:
        raise UsageError(f"--pages selects at most {MAX_PAGES} pages per question (got {len(pages)})")
    return pages


def pdf_pages(
    path: str, pages: str | None = None, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
) -> tuple[list[ImageRef], str | None]:
    """The chosen pages of the PDF at `path` as images, and a note when only page 1 was taken by default."""
    chosen = parse_pages(pages) if pages else [1]
    try:
        import pypdfium2 as pdfium
    except ImportError:
        raise InputError(f"{path} is a PDF: {INSTALL_HINT}") from None
    data = read_pdf(Path(path).expanduser(), path)
    document = open_document(pdfium, data, path)
    try:
        count = len(document)
        if count > MAX_DOCUMENT_PAGES:
            raise InputError(
                f"{path} has {count:,} pages, more than {MAX_DOCUMENT_PAGES:,}; split it and ask about the part you need"
            )
        if missing := [page for page in chosen if page > count]:
            raise InputError(f"{path} has {count} page(s); there is no page {missing[0]}")
        digest = hashlib.sha256(data).hexdigest()
        images = [render_page(pdfium, document, path, number, digest, max_pixels) for number in chosen]
    finally:
        document.close()
    note = (
        f"{path} has {count} pages; reading page 1 only (--pages 1-3,7 chooses others)"
        if pages is None and count > 1
        else None
    )
    return images, note


def read_pdf(file: Path, name: str) -> bytes:
    data = read_media_file(file, name, "PDF", MAX_PDF_BYTES, "extract the pages you need")
    if not data.lstrip()[:5] == b"%PDF-":
        raise InputError(f"{name} is not a PDF (no %PDF- header)")
    return data


def open_document(pdfium, data: bytes, name: str):  # type: ignore[no-untyped-def]
    try:
        return pdfium.PdfDocument(data)
    except pdfium.PdfiumError as err:
        if err.err_code == pdfium.raw.FPDF_ERR_PASSWORD:
            raise InputError(
                f"{name} is encrypted (password-protected); save a decrypted copy (e.g. qpdf --decrypt) and use that"
            ) from None
        if err.err_code == pdfium.raw.FPDF_ERR_SECURITY:
            raise InputError(f"{name} uses an unsupported security handler; save a plain copy and use that") from None
        raise InputError(f"{name} is a broken or unreadable PDF ({one_line(err)}); re-export it") from None


def render_page(pdfium, document, name: str, number: int, digest: str, max_pixels: int) -> ImageRef:  # type: ignore[no-untyped-def]
    from llava_cli.media.images import ImageRef

    label = f"{name} page {number}"
    try:
        page = document[number - 1]
        try:
            width, height = page.get_size()
            if not (width >= 1 and height >= 1):
                raise InputError(f"{label} has no size ({width:g}x{height:g} points)")
            dpi = min(MAX_DPI, max(MIN_DPI, RENDER_SIDE * POINTS_PER_INCH / max(width, height)))
            scale = dpi / POINTS_PER_INCH
            check_size(SizeOnly(round(width * scale), round(height * scale)), label, max_pixels)
            image = page.render(scale=scale, may_draw_forms=False).to_pil().convert("RGB")
        finally:
            page.close()
    except InputError:
        raise
    except Exception as err:  # PDFium reports broken pages with several exception types
        raise InputError(f"{label} cannot be rendered ({one_line(err)}); re-export the PDF") from None
    page_digest = hashlib.sha256(
        f"{digest}:page {number}".encode()
    ).hexdigest()  # a sha256, as saved conversations hold
    return ImageRef(name=label, digest=page_digest, image=shrink_to_usable(image))


class SizeOnly:
    """What images.check_size reads of an image, before the page is rendered."""

    def __init__(self, width: int, height: int) -> None:
        self.size = (width, height)


def image_or_pages(
    name: str, pages: str | None, max_pixels: int, open_image: Callable[[str, int], ImageRef]
) -> tuple[list[ImageRef], str | None]:
    """The inputs one argument names: a PDF's pages (and `pdf_pages`' note), else `open_image(name)` alone."""
    if is_pdf(name):
        return pdf_pages(name, pages, max_pixels)
    return [open_image(name, max_pixels)], None
