"""PDF pages as images: `llava ask report.pdf`, `--pages`, `/image report.pdf`, and hostile PDFs (pypdfium2, the [pdf] extra)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from cli_runner import invoke
from fake_io import FakeIO
from helpers import SHORT_ANSWER as MAX_NEW
from helpers import render_llava15

from llava_cli.base.errors import UsageError
from llava_cli.media.pdfpages import MAX_DPI, parse_pages

pdfium = pytest.importorskip("pypdfium2")
QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def report(images, tmp_path_factory) -> Path:
    """A three-page PDF: the red, green and blue test pictures, one per page (Pillow's PDF writer)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("pdf") / "report.pdf"
    red, green, blue = (Image.open(images[name]).convert("RGB") for name in ("red", "green", "blue"))
    red.save(path, "PDF", resolution=72, save_all=True, append_images=[green, blue])
    return path


def rendered(pdf: Path, page: int, folder: Path) -> Path:
    """Page `page` rendered independently of llava_cli: a small page hits the DPI cap."""
    document = pdfium.PdfDocument(str(pdf))
    path = folder / f"page{page}.png"
    document[page - 1].render(scale=MAX_DPI / 72, may_draw_forms=False).to_pil().convert("RGB").save(path)
    document.close()
    return path


def test_pages_are_asked_about_as_images(report, tiny_model, reference, tmp_path, monkeypatch):
    outcome = invoke(
        monkeypatch,
        "ask",
        report,
        "--pages",
        "3,1",
        QUESTION,
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        "--json",
        "--no-save",
    )
    assert outcome.code == 0, outcome.stderr
    pages = [rendered(report, 3, tmp_path), rendered(report, 1, tmp_path)]
    assert json.loads(outcome.stdout)["answer"] == reference.answer(
        render_llava15([(QUESTION, 2, None)]), pages, MAX_NEW
    )
    assert outcome.stderr == ""


def test_without_pages_the_first_page_is_read_and_it_says_so(report, tiny_model, reference, tmp_path, monkeypatch):
    outcome = invoke(monkeypatch, "ask", report, QUESTION, "--model", tiny_model, "-n", MAX_NEW, "--no-save")
    assert outcome.code == 0, outcome.stderr
    assert (
        outcome.stdout
        == reference.answer(render_llava15([(QUESTION, 1, None)]), [rendered(report, 1, tmp_path)], MAX_NEW) + "\n"
    )
    assert outcome.stderr == f"llava: note: {report} has 3 pages; reading page 1 only (--pages 1-3,7 chooses others)\n"


def test_image_command_attaches_a_pdf_page_in_chat(report, tiny_loaded, tiny_settings, llava_home_dir, tmp_path):
    from PIL import Image

    from llava_cli.chat.loop import ChatLoop
    from llava_cli.engine.local import Engine
    from llava_cli.store.conversations import Recorder, SessionStore

    io_ = FakeIO()
    io_.lines = [f"/image {report}"]
    loop = ChatLoop(Engine(tiny_loaded), tiny_settings, io_, Recorder(SessionStore.default()))
    loop.run([])
    assert io_.infos[:2] == [
        f"{report} has 3 pages; reading page 1 only (--pages 1-3,7 chooses others)",
        f"attached {report} page 1; it goes with your next message",
    ]
    assert (
        loop.attached[0].image.size == Image.open(rendered(report, 1, tmp_path)).size == (400, 334)
    )  # 48x40 points at 600 DPI


def encrypted_pdf() -> bytes:
    """A one-page PDF under the standard security handler, whose empty user password is wrong."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 100 100] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <" + b"41" * 32 + b"> /U <" + b"42" * 32 + b"> /P -4 >>",
    ]
    out = io.BytesIO()
    out.write(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(
        b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 4 0 R /ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>] >>\nstartxref\n%d\n%%%%EOF\n"
        % (len(objects) + 1, xref)
    )
    return out.getvalue()


def many_pages(count: int) -> bytes:
    document = pdfium.PdfDocument.new()
    for _ in range(count):
        document.new_page(72, 72)
    out = io.BytesIO()
    document.save(out)
    document.close()
    return out.getvalue()


@pytest.mark.parametrize(
    ("content", "pages", "message"),
    [
        (
            encrypted_pdf,
            None,
            "{path} is encrypted (password-protected); save a decrypted copy (e.g. qpdf --decrypt) and use that",
        ),
        (
            lambda: b"%PDF-1.7\n1 0 obj << /Type /Catalog",
            None,
            "{path} is a broken or unreadable PDF (Failed to load document (PDFium: Data format error).); re-export it",
        ),
        (lambda: b"GIF89a not a pdf at all", None, "{path} is not a PDF (no %PDF- header)"),
        (
            lambda: many_pages(10_000),
            None,
            "{path} has 10,000 pages, more than 2,000; split it and ask about the part you need",
        ),
        (lambda: many_pages(2), "5", "{path} has 2 page(s); there is no page 5"),
        (lambda: many_pages(2), "1-20", "--pages selects at most 8 pages per question (got 1-20)"),
    ],
)
def test_hostile_pdfs_are_one_line_errors(content, pages, message, tmp_path, monkeypatch):
    path = tmp_path / "doc.pdf"
    path.write_bytes(content())
    outcome = invoke(
        monkeypatch, "ask", path, *(["--pages", pages] if pages else []), QUESTION, "--model", "never/loaded"
    )
    assert (outcome.code, outcome.stdout, outcome.stderr) == (2, "", f"llava: error: {message.format(path=path)}\n")


def test_a_fifo_named_pdf_is_refused_without_blocking(tmp_path, monkeypatch):
    import os

    fifo = tmp_path / "pipe.pdf"
    os.mkfifo(fifo)
    outcome = invoke(monkeypatch, "ask", fifo, QUESTION, "--model", "never/loaded")
    assert (outcome.code, outcome.stderr) == (2, f"llava: error: {fifo} is a FIFO (named pipe), not a PDF\n")


def test_page_lists_parse_and_bad_ones_are_refused():
    assert parse_pages("1-3,7") == [1, 2, 3, 7]
    assert parse_pages(" 2 , 2-3 ") == [2, 3]
    for bad in ("", "0", "3-1", "a", "1,,2"):
        with pytest.raises(UsageError):
            parse_pages(bad)


def test_pages_without_a_pdf_is_refused(images, monkeypatch):
    outcome = invoke(monkeypatch, "ask", images["red"], "--pages", "2", QUESTION, "--model", "never/loaded")
    assert (
        outcome.code == 2 and outcome.stderr == "llava: error: --pages selects pages of a PDF, and no PDF was given\n"
    )


def test_without_the_pdf_extra_it_says_how_to_install_it(report, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # as if it were not installed
    outcome = invoke(monkeypatch, "ask", report, QUESTION, "--model", "never/loaded")
    assert (outcome.code, outcome.stderr) == (
        2,
        f"llava: error: {report} is a PDF: reading PDFs needs pypdfium2: pip install 'llava-cli[pdf]'\n",
    )


def test_a_saved_page_cannot_be_re_read_on_resume(report, tiny_model, llava_home_dir, monkeypatch):
    first = invoke(monkeypatch, "ask", report, QUESTION, "--model", tiny_model, "-n", MAX_NEW)
    assert first.code == 0, first.stderr
    saved = json.loads(next((llava_home_dir / "sessions").rglob("*.json")).read_text())
    assert [(image["name"], image["path"]) for image in saved["turns"][0]["images"]] == [(f"{report} page 1", None)]
    resumed = invoke(monkeypatch, "ask", "-c", "and now?", "--model", tiny_model, "-n", MAX_NEW)
    assert resumed.code == 2
    assert (
        f"{report} page 1 was not read from a file of its own (a URL or a PDF page) and cannot be read again"
        in resumed.stderr
    )


def test_chat_image_option_takes_a_pdf(report, tiny_model, reference, tmp_path, llava_home_dir, monkeypatch):
    outcome = invoke(
        monkeypatch,
        "chat",
        "--image",
        report,
        "--model",
        tiny_model,
        "-n",
        MAX_NEW,
        "--no-save",
        stdin=f"{QUESTION}\n".encode(),
    )
    assert outcome.code == 0, outcome.stderr
    assert (
        outcome.stdout
        == reference.answer(render_llava15([(QUESTION, 1, None)]), [rendered(report, 1, tmp_path)], MAX_NEW) + "\n"
    )
