"""Byte streams of input files, hashed as they are read: plain, gzip or Zstandard (megasynth.data.readers).

    raw, stream = open_hashed(open(path, "rb", buffering=0), "zstd")
    ... stream.readline() ...
    raw.drain(); raw.sha256.hexdigest()       # the file's sha256, read once
"""

from __future__ import annotations

import gzip
import hashlib
import io

READ_BLOCK = 1 << 20


class HashingRaw(io.RawIOBase):
    """A raw file that feeds every byte it reads to sha256 and counts them."""

    def __init__(self, f):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._f.readinto(b)
        if n:
            self.sha256.update(memoryview(b)[:n])
            self.count += n
        return n

    def drain(self) -> None:
        """Hash what the decompressor left unread (padding after the last frame), so the hash is the file's."""
        while block := self._f.read(READ_BLOCK):
            self.sha256.update(block)
            self.count += len(block)


class ZstdRaw(io.RawIOBase):
    """Zstandard frames, one after another, that raises on a truncated frame (zstandard's stream_reader
    returns the truncated data silently)."""

    def __init__(self, raw):
        import zstandard  # noqa: PLC0415

        self._zstd = zstandard
        self._raw = raw
        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False
        self._out = memoryview(b"")  # decompressed bytes not yet handed out (a view: no copy per read)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while not len(self._out):
            data = self._raw.read(READ_BLOCK)
            if not data:
                if self._in_frame:
                    raise EOFError("the zstd stream ends inside a frame (truncated file)")
                return 0
            parts = []
            while data:
                self._in_frame = True
                try:
                    parts.append(self._d.decompress(data))
                except self._zstd.ZstdError as e:
                    raise ValueError(f"corrupt zstd data ({e})") from e
                if not self._d.eof:
                    break
                data, self._in_frame = self._d.unused_data, False  # the next frame starts in the same block
                self._d = self._zstd.ZstdDecompressor().decompressobj()
            self._out = memoryview(b"".join(parts))
        n = min(len(b), len(self._out))
        b[:n] = self._out[:n]
        self._out = self._out[n:]
        return n


def open_hashed(f, compression: str | None) -> tuple[HashingRaw, io.BufferedIOBase]:
    """(the raw file, hashing what is read, and the decompressed stream) of an unbuffered binary file `f`;
    `compression` is "gzip", "zstd" or None."""
    raw = HashingRaw(f)
    if compression == "gzip":
        stream = gzip.GzipFile(fileobj=io.BufferedReader(raw, READ_BLOCK), mode="rb")
    elif compression == "zstd":
        stream = io.BufferedReader(ZstdRaw(raw), READ_BLOCK)
    else:
        stream = io.BufferedReader(raw, READ_BLOCK)
    return raw, stream
