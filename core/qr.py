"""QR codes: the PNG a screen shows and the block text a terminal shows, from the raw string a gateway gives."""

from __future__ import annotations

import io

import segno


def qr_png_data_url(code: str, *, scale: int = 6) -> str:
    """A ``data:image/png;base64,…`` URL of ``code`` as a QR code (what an ``<img>`` shows and a phone scans)."""
    return str(segno.make(code, error="m").png_data_uri(scale=scale, border=4))


def qr_terminal_text(code: str) -> str:
    """``code`` as a QR code drawn with Unicode half blocks, two modules per character row."""
    buffer = io.StringIO()
    segno.make(code, error="m").terminal(out=buffer, compact=True, border=2)
    return buffer.getvalue()


def qr_image_url(code: str) -> str:
    """The image to show for a stored QR code: rendered from the raw string, or kept as is when a gateway gave only
    an image (MegaAPI's ``qrcode_base64``)."""
    return code if code.startswith("data:image/") else qr_png_data_url(code)
