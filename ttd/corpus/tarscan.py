"""A fast, caption-only scan of a tar stream: member names, and the bytes of the members a caller asks for.

`tarfile` costs about 70 µs per member in pure Python (header parsing through several layers, a file object per
member), which caps a caption-only pass at about 4,500 samples/s, far below what tokenising captions costs.
Captions are a few bytes inside a shard of images, so this scanner only reads 512-byte headers and member bytes,
which the caller keeps or drops at once. It understands ustar headers, per-file pax headers (`path`, `size`,
which webdataset's writer emits for every member) and GNU long names; anything else (global pax headers, sparse
files, base-256 sizes) raises `Unsupported` and the caller falls back to `tarfile`.

Corruption follows `tarfile`'s stream mode: a bad first header is an error, a bad or short header later ends the
archive quietly (the caller then reports the keys it never saw), and a member whose data or padding ends early is an
error.
"""

from __future__ import annotations

import tarfile
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np

BLOCK = 512
CHUNK = 1 << 20  # read the stream in 1 MiB pieces: one read call per many members, not three per member
_REGULAR = (b"0", b"\0", b"7")
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: header only
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # gzip, bzip2, xz magic: tarfile's "r|*" would decompress


class Unsupported(Exception):
    """The tar uses a feature this scanner does not implement; read it with `tarfile` instead."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:
        raise Unsupported("base-256 number field")
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8)


def _size(header: bytes) -> int:
    if header[135] in (0, 32):  # the usual "%011o" + terminator: one int() call
        try:
            return int(header[124:135], 8)
        except ValueError:
            pass
    return _octal(header[124:136])


def _checksum_ok(header: bytes) -> bool:
    """tarfile's test: the header's byte sum, with the checksum field counted as eight spaces, unsigned or signed."""
    try:
        want = int(header[148:154], 8) if header[154:156] == b"\0 " else -1  # "%06o\0 ": tarfile's own layout
    except ValueError:
        want = -1
    if want < 0:
        try:
            want = _octal(header[148:156])
        except ValueError:
            return False
    if header.isascii():  # then the sum is below 65521 and adler32's low half (1 + sum, mod 65521) gives it in C
        return want == (zlib.adler32(header) & 0xFFFF) - 1 - sum(header[148:156]) + 256
    unsigned = sum(header[:148]) + 256 + sum(header[156:])
    if want == unsigned:
        return True
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:]) + 256
    return want == signed


def _pax(data: bytes) -> dict[str, str]:
    """Records `LEN key=value\\n`; only `path` and `size` matter here."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(data[pos:space])
        except ValueError:
            raise tarfile.ReadError("invalid pax header") from None
        if length <= 0:
            raise tarfile.ReadError("invalid pax header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _refill(f: BinaryIO, buf: bytes, pos: int, n: int) -> bytes:
    """What is left of `buf` from `pos`, plus reads until it holds `n` bytes (fewer only at the end)."""
    parts, have = [buf[pos:]], len(buf) - pos
    while have < n:
        more = f.read(max(CHUNK, n - have))
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[345] and header[257:262] == b"ustar":  # a ustar prefix (long paths)
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def scan(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) for every regular file, in archive order; the caller keeps what it needs.

    The hot loop of caption-only reading (three members per sample): local variables, one buffer, few calls."""
    buf, pos = b"", 0
    first = True
    pending: dict[str, str] = {}  # from a pax or GNU long-name header, for the next member
    while True:
        if len(buf) - pos < BLOCK:
            buf, pos = _refill(f, buf, pos, BLOCK), 0
        header = buf[pos:pos + BLOCK]
        pos += BLOCK
        if first and header.startswith(_COMPRESSED):
            raise Unsupported("compressed tar")
        problem = None
        if len(header) < BLOCK:
            problem = "empty file" if not header else "truncated header"
        elif header.count(0) == BLOCK:  # end of archive
            if pending:
                raise tarfile.ReadError("archive ends after an extended header")
            return
        elif not _checksum_ok(header):
            problem = "bad checksum"
        else:
            try:
                size = _size(header)
            except ValueError:
                problem = "invalid header"
        if problem:
            if first or pending:  # tarfile fails on a bad first header and on one after pax/long-name
                raise tarfile.ReadError(problem)
            return  # like tarfile: the archive ends here
        first = False
        kind = header[156:157]
        if kind in (b"x", b"L", b"K"):  # pax, GNU long name, GNU long link: data for the next header
            padded = -(-size // BLOCK) * BLOCK
            if len(buf) - pos < padded:
                buf, pos = _refill(f, buf, pos, padded), 0
            data = buf[pos:pos + size]
            pos += padded
            if pos > len(buf):
                raise tarfile.ReadError("unexpected end of data")
            if kind == b"x":
                pending.update(_pax(data))
            elif kind == b"L":
                pending["path"] = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pending.setdefault("linkpath", "")
            continue
        name = pending.get("path") or _name(header)
        if "size" in pending:
            size = int(pending["size"])
        pending = {}
        if kind in _NO_DATA or (kind == b"\0" and name.endswith("/")):
            continue
        if kind not in _REGULAR:
            raise Unsupported(f"tar member type {kind!r}")
        padded = -(-size // BLOCK) * BLOCK
        if len(buf) - pos < padded:
            buf, pos = _refill(f, buf, pos, padded), 0
        avail = len(buf) - pos
        if avail < size:
            raise tarfile.ReadError("unexpected end of data")
        data = buf[pos:pos + size]
        pos += padded
        yield name, data
        if avail < padded:  # like tarfile: the member is whole, but the archive ends in its padding
            raise tarfile.ReadError("unexpected end of data")


_POW8 = 8 ** np.arange(5, -1, -1)
_SIZE_POW8 = 8 ** np.arange(10, -1, -1)
_MAGIC = np.frombuffer(b"ustar", dtype=np.uint8)
SCAN_BUFFER = 16 << 20  # fast_scan works on the archive 16 MiB at a time


def _headers_valid(h: np.ndarray) -> bool:
    """Every header row has tarfile's checksum layout ("%06o\0 ") with a matching unsigned byte sum, a plain
    "%011o" size and no ustar prefix."""
    field = h[:, 148:156]
    if not ((field[:, 6] == 0) & (field[:, 7] == 32)).all():
        return False
    digits = field[:, :6].astype(np.int64) - 48
    if ((digits < 0) | (digits > 7)).any():
        return False
    if not (((h[:, 135] == 0) | (h[:, 135] == 32)) & (h[:, 345] == 0)).all():
        return False
    return bool((h.sum(axis=1, dtype=np.int64) - field.sum(axis=1, dtype=np.int64) + 256 == digits @ _POW8).all())


def _sizes(h: np.ndarray) -> np.ndarray | None:
    digits = h[:, 124:135].astype(np.int64) - 48
    if ((digits < 0) | (digits > 7)).any():
        return None
    return digits @ _SIZE_POW8


def fast_scan(f: BinaryIO) -> list[tuple[str, bytes | None]] | None:
    """(name, bytes of `.txt` members else None) for a pristine archive, or None: anything unusual (a damaged or
    truncated archive, GNU or size-carrying pax headers, prefixed names, a non-ustar header) is left to `scan`,
    which then reads the stream again.

    Vectorised: in each buffer the blocks carrying the ustar magic are the candidate headers; their sizes say
    where each member's successor starts, and the archive is accepted only if those chain exactly from the
    buffer's first block to the next buffer or to the end-of-archive block (so a member's data that happens to
    look like a header makes the scan give up, never misread). Only names and `.txt` bytes reach Python."""
    out: list[tuple[str, bytes | None]] = []
    carry, skip = b"", 0  # bytes from the next header on; bytes of a long member still to pass over
    path: str | None = None  # from a pax header, for the next member
    while True:
        data = f.read(SCAN_BUFFER)
        if skip:
            if len(data) <= skip:
                if not data:
                    return None  # ends inside a member
                skip -= len(data)
                continue
            data, skip = data[skip:], 0
        buf = carry + data if carry else data
        nblk = len(buf) // BLOCK
        if nblk == 0:
            return None  # no end-of-archive block: tarfile's own rules apply
        a = np.frombuffer(buf, dtype=np.uint8, count=nblk * BLOCK).reshape(nblk, BLOCK)
        heads = np.flatnonzero((a[:, 257:262] == _MAGIC).all(axis=1))
        if not len(heads):
            if not a[0].any():
                return out if path is None else None  # end of archive
            return None
        if heads[0] != 0:
            return None
        h = a[heads]
        sizes = _sizes(h)
        if sizes is None or not _headers_valid(h):
            return None
        after = heads + 1 + (sizes + BLOCK - 1) // BLOCK
        if (after[:-1] != heads[1:]).any():
            return None
        kinds = h[:, 156]
        names = h[:, :100].copy().view("S100").ravel().tolist()  # numpy drops the trailing NULs
        whole = len(heads) - 1 if after[-1] > nblk else len(heads)  # the last member may run past this buffer
        begins = ((heads[:whole] + 1) * BLOCK).tolist()
        ends = (heads[:whole] * BLOCK + BLOCK + sizes[:whole]).tolist()
        if not whole:
            pass
        elif path is None and ((kinds[:whole] == 48) | (kinds[:whole] == 0)).all():  # the usual case: in bulk
            try:
                decoded = b"\0".join(names[:whole]).decode("utf-8").split("\0")
            except UnicodeDecodeError:
                return None
            if len(decoded) != whole or any(n.endswith("/") for n in decoded):  # a NUL inside a name; a directory
                return None
            out.extend([(n, buf[b:e] if n[-4:].lower() == ".txt" else None)
                        for n, b, e in zip(decoded, begins, ends)])
        else:
            for i, kind in enumerate(kinds[:whole].tolist()):
                if kind == 120:  # 'x': a pax header for the next member
                    pax = _pax(buf[begins[i]:ends[i]])
                    if "size" in pax:
                        return None
                    path = pax.get("path", path)
                elif kind in (48, 0):  # '0' or '\0': a regular file
                    try:
                        name = path or names[i].split(b"\0", 1)[0].decode("utf-8")
                    except UnicodeDecodeError:
                        return None
                    if name.endswith("/"):
                        return None
                    out.append((name, buf[begins[i]:ends[i]] if name[-4:].lower() == ".txt" else None))
                    path = None
                else:
                    return None
        last = int(heads[-1])
        end = int(after[-1])
        if end > nblk:  # a member continues into the next read: keep its header onwards, or pass over its data
            if kinds[-1] not in (120, 48, 0):
                return None
            rest = len(buf) - last * BLOCK
            need = (end - last) * BLOCK
            if kinds[-1] == 120 or names[-1][-4:].lower() == b".txt" or need <= SCAN_BUFFER:
                carry = buf[last * BLOCK:]
                more = f.read(need - rest)
                if len(more) < need - rest:
                    return None
                carry += more  # the whole member is in `carry` now: the next buffer starts with it
                continue
            name_i = len(heads) - 1
            try:
                name = path or names[name_i].split(b"\0", 1)[0].decode("utf-8")
            except UnicodeDecodeError:
                return None
            out.append((name, None))
            path = None
            skip, carry = need - rest, b""
            continue
        if end < nblk:  # the next block is inside this buffer and is no header: it must end the archive
            if not a[end].any():
                return out if path is None else None
            return None
        carry = buf[end * BLOCK:]  # the members end at the buffer's last whole block: a partial one carries on
