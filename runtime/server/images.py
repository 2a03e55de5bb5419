"""Image parts of a chat request -> image bytes for Engine.submit.

- data URLs (`data:image/png;base64,...`): PNG, JPEG, WebP and GIF, always accepted; the bytes must really be
  one of those formats (checked by their signature, whatever the URL says);
- http(s) URLs: only when the server runs with --allow-image-urls; fetched directly (no proxy) with a total
  timeout, a byte cap (Content-Length and the bytes actually read), and redirects followed only within the
  same scheme, host and port (at most 3);
- anything else (file:, a local path, ftp:, ...) is refused: the server never reads its own files.

Every failure raises APIError(400) naming the message part it came from. Standard library only.
"""
from __future__ import annotations

import base64
import binascii
import time
import urllib.error
import urllib.parse
import urllib.request

from .protocol import APIError, ImageRef, bad_request

DATA_MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")
MAX_REDIRECTS = 3
READ_CHUNK = 64 * 1024


def image_format(data: bytes) -> str | None:
    """'png' / 'jpeg' / 'gif' / 'webp' from the file signature, else None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _check_bytes(data: bytes, ref: ImageRef, max_bytes: int) -> bytes:
    if len(data) > max_bytes:
        raise bad_request(f"{ref.param}: the image is {len(data)} bytes, over this server's limit of {max_bytes} "
                          "bytes (--max-image-bytes)", ref.param, code="image_too_large")
    if not data:
        raise bad_request(f"{ref.param}: the image is empty", ref.param, code="invalid_image")
    if image_format(data) is None:
        raise bad_request(f"{ref.param}: not a PNG, JPEG, WebP or GIF image", ref.param, code="invalid_image")
    return data


def decode_data_url(ref: ImageRef, max_bytes: int) -> bytes:
    head, sep, payload = ref.url.partition(",")
    if not sep or not head.lower().endswith(";base64"):
        raise bad_request(f"{ref.param}: a data URL must look like data:image/png;base64,<data>", ref.param,
                          code="invalid_image_url")
    mime = head[5:].split(";")[0].strip().lower()
    if mime not in DATA_MIME_TYPES:
        raise bad_request(f"{ref.param}: data URL type {mime or '(none)'!r} is not supported (use image/png, "
                          "image/jpeg, image/webp or image/gif)", ref.param, code="invalid_image_url")
    payload = "".join(payload.split())  # line breaks inside base64 are common
    if len(payload) // 4 * 3 > max_bytes + 3:
        raise bad_request(f"{ref.param}: the image is about {len(payload) // 4 * 3} bytes, over this server's limit "
                          f"of {max_bytes} bytes (--max-image-bytes)", ref.param, code="image_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{ref.param}: the data URL is not valid base64", ref.param, code="invalid_image_url") \
            from None
    return _check_bytes(data, ref, max_bytes)


def _origin(url: str) -> tuple[str, str, int | None]:
    u = urllib.parse.urlsplit(url)
    return u.scheme.lower(), (u.hostname or "").lower(), u.port or {"http": 80, "https": 443}.get(u.scheme.lower())


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if _origin(newurl) != _origin(req.full_url):
            raise urllib.error.URLError(f"redirected to another host ({_origin(newurl)[1] or newurl}), which is not "
                                        "followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _SameOriginRedirects())


def fetch_url(ref: ImageRef, max_bytes: int, timeout: float) -> bytes:
    """GET an http(s) image with a total `timeout` (seconds) and a byte cap. Blocking: call it in a thread."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(ref.url, headers={"User-Agent": "phi3v-edge-server", "Accept": "image/*"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise bad_request(f"{ref.param}: the image at the URL is {length} bytes, over this server's limit of "
                                  f"{max_bytes} bytes (--max-image-bytes)", ref.param, code="image_too_large")
            parts, total = [], 0
            while True:
                if time.monotonic() > deadline:
                    raise TimeoutError
                block = resp.read(READ_CHUNK)
                if not block:
                    break
                total += len(block)
                if total > max_bytes:
                    raise bad_request(f"{ref.param}: the image at the URL is over this server's limit of {max_bytes} "
                                      "bytes (--max-image-bytes)", ref.param, code="image_too_large")
                parts.append(block)
    except APIError:
        raise
    except urllib.error.HTTPError as e:
        raise bad_request(f"{ref.param}: fetching the image failed: HTTP {e.code} {e.reason}", ref.param,
                          code="image_fetch_failed") from None
    except (TimeoutError, OSError, urllib.error.URLError, ValueError) as e:
        reason = f"no answer within {timeout:g} s" if isinstance(e, TimeoutError) or "timed out" in str(e) else (
            getattr(e, "reason", None) or e)
        raise bad_request(f"{ref.param}: fetching the image failed: {reason}", ref.param,
                          code="image_fetch_failed") from None
    return _check_bytes(b"".join(parts), ref, max_bytes)


def resolve_image(ref: ImageRef, *, allow_urls: bool, max_bytes: int, timeout: float) -> bytes:
    """The image's bytes (blocking for URLs: run in a thread)."""
    scheme = ref.url.split(":", 1)[0].lower() if ":" in ref.url else ""
    if scheme == "data":
        return decode_data_url(ref, max_bytes)
    if scheme in ("http", "https"):
        if not allow_urls:
            raise bad_request(f"{ref.param}: image URLs are not enabled on this server (send the image as a "
                              "data:image/...;base64 URL, or start the server with --allow-image-urls)", ref.param,
                              code="image_urls_disabled")
        return fetch_url(ref, max_bytes, timeout)
    raise bad_request(f"{ref.param}: only data: URLs{' and http(s) URLs' if allow_urls else ''} are accepted "
                      "(the server never reads local files)", ref.param, code="invalid_image_url")
