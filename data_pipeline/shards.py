"""The on-disk format: WebDataset tar shards of fixed-length token sequences plus a manifest.

A sample is one tar member ``<key>.tokens.npy`` (a 1-D array of token ids, uint16 when the
vocabulary fits, else uint32), so a plain ``webdataset.WebDataset(url).decode()`` reads it too.
A manifest's ``kind`` says what a sample is: ``pretrain`` (or none: manifests before SFT shards)
seq_len ids of packed text; ``sft`` seq_len + 1 ids, a (prompt, response) pair's prompt length
then its tokens padded with EOS (data_pipeline/sft.py, ``sft_sample``).
Tars are written deterministically (fixed mtime/owner/mode): same inputs, byte-identical shards.

A shard is read whole (a file or any ``pipe:`` URL) and checked against the size and sha256 its
manifest recorded at prepare time before any of its samples is used (``read_shard``); sha256
because the manifest has always carried it and it runs at about 1 GB/s on CPUs with SHA
extensions, some 40x the loader's need. A small ustar parser then walks the bytes in memory,
checking each header's checksum.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

import numpy as np

from data_pipeline.errors import DataConfigError
from data_pipeline.files import atomic_write

MANIFEST = "manifest.json"
FORMAT = "llada-shards"
VERSION = 1
TOKENS_EXT = "tokens.npy"
BLOCK = 512
KINDS = ("pretrain", "sft")  # a manifest's kind: what one sample holds (the module docstring)


class ShardError(Exception):
    """A shard that cannot be read (missing, truncated, corrupt); names the shard."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def encode_tokens(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=False)
    return buf.getvalue()


_NPY_HEADERS: Dict[bytes, Tuple[np.dtype, tuple]] = {}  # header bytes -> (dtype, shape)


def decode_tokens(data) -> np.ndarray:
    """A .npy payload as an array. Shards repeat one header (same dtype and shape), so each
    distinct header is parsed once by numpy and then served from a cache: no per-sample
    header parsing on the hot path."""
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy array")
    size_bytes = 2 if data[6] == 1 else 4
    start = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    header = bytes(data[:start])
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        arr = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
        if arr.dtype.hasobject or arr.flags.f_contiguous and arr.ndim > 1:
            return arr  # unusual: not cached
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[header] = (arr.dtype, arr.shape)
        return arr
    dtype, shape = meta
    count = int(np.prod(shape))
    if len(data) - start != count * dtype.itemsize:
        raise ValueError(f"array data is {len(data) - start} bytes, expected "
                         f"{count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=start).reshape(shape)


class ShardWriter:
    """One tar shard written under ``<final>.tmp`` and renamed when closed complete.
    ``sample_tokens``: the tokens a sample counts for in the shard's entry (None: its ids; an SFT
    sample's first id is its prompt length, not a token)."""

    def __init__(self, final: Path, sample_tokens: Optional[int] = None):
        self.final, self.sample_tokens = final, sample_tokens
        self.tmp = final.with_name(final.name + ".tmp")
        self._file = open(self.tmp, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0
        self.tokens = 0

    def add(self, key: str, tokens: np.ndarray) -> None:
        data = encode_tokens(tokens)
        info = tarfile.TarInfo(f"{key}.{TOKENS_EXT}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self.samples += 1
        self.tokens += int(tokens.size) if self.sample_tokens is None else self.sample_tokens

    def close(self) -> dict:
        self._tar.close()
        self._file.close()
        data = self.tmp.read_bytes()
        self.tmp.replace(self.final)
        return {"file": self.final.name, "samples": self.samples, "tokens": self.tokens,
                "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def abort(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)


def _header(block: bytes, shard: str) -> Tuple[str, int, bytes]:
    """(name, size, type) of a ustar header block, after checking its checksum."""
    try:
        stored = int(block[148:156].rstrip(b"\0 ").decode() or "0", 8)
        size = int(block[124:136].rstrip(b"\0 ").decode() or "0", 8)
    except ValueError:
        raise ShardError(f"{shard}: corrupt tar header (not octal)") from None
    computed = sum(block) - sum(block[148:156]) + 8 * 32  # the checksum field counts as blanks
    if stored != computed:
        raise ShardError(f"{shard}: corrupt tar header (checksum mismatch)")
    name = block[0:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0] if block[257:262] == b"ustar" else b""
    if prefix:
        name = prefix + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


_ZERO_BLOCK = bytes(BLOCK)


def tar_members(buf, shard: str) -> Iterator[Tuple[str, memoryview]]:
    """(name, data) of each regular file of a tar archive held in memory (``data`` a view into
    ``buf``, not a copy). Raises ShardError where the archive is truncated or a header is
    corrupt. Only the end-of-archive zero block ends it cleanly: an archive that stops at a
    member boundary without it (an interrupted copy, an empty file) is truncated, not short."""
    view = memoryview(buf)
    pos, end = 0, len(view)
    long_name: Optional[str] = None
    while True:
        block = bytes(view[pos:pos + BLOCK])
        if block == _ZERO_BLOCK:
            return
        if not block:
            raise ShardError(f"{shard}: truncated (no end-of-archive marker)")
        if len(block) < BLOCK:
            raise ShardError(f"{shard}: truncated (partial tar header)")
        name, size, kind = _header(block, shard)
        pos += BLOCK
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if pos + padded > end:
            raise ShardError(f"{shard}: truncated inside member {name!r}")
        data = view[pos:pos + size]
        pos += padded
        if kind == b"L":  # GNU long name for the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8", "replace")
            continue
        if kind in (b"0", b"\0"):
            yield (long_name or name), data
        long_name = None  # directories, pax headers, links: not samples


def split_key(name: str) -> Tuple[str, str]:
    """WebDataset's convention: the key is the path up to the first dot of the base name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def open_url(url: str) -> BinaryIO:
    """A local path or any WebDataset URL (``pipe:cmd``, ``file:``, http...)."""
    if url.startswith("pipe:") or "://" in url:
        import webdataset
        return webdataset.gopen(url, "rb")
    return open(url.removeprefix("file:"), "rb", buffering=1 << 20)


def read_shard(shard_set: "ShardSet", i: int) -> bytes:
    """Shard ``i`` read whole and checked against the size and sha256 its manifest recorded at
    prepare time: nothing of a shard is used unless all of it is what prepare wrote (a flipped
    byte inside a sample's data leaves every tar header intact). OSError: it cannot be read;
    ShardError: it is not what prepare wrote."""
    url, entry = shard_set.url(i), shard_set.shards[i]
    with open_url(url) as f:
        data = f.read(entry["bytes"] + 1)  # one byte more tells a longer file
    size = entry["bytes"]
    if len(data) != size:
        what = f"{len(data)} bytes" if len(data) < size else f"more than {size} bytes"
        raise ShardError(f"{url}: {what}, the manifest records {size} (truncated or replaced "
                         "since prepare)")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ShardError(f"{url}: content does not match the sha256 its manifest records "
                         "(damaged since prepare)")
    return data


@dataclass
class ShardSet:
    """A loaded, checked manifest: what the loader needs to stream a dataset."""

    name: str
    manifest: Path
    seq_len: int
    dtype: str
    vocab_size: int
    special_ids: Dict[str, Optional[int]]
    tokenizer_sha256: str
    tokenizer_path: Path
    shards: List[dict]
    shards_url: Optional[str] = None
    kind: str = "pretrain"  # one of KINDS

    @property
    def sample_len(self) -> int:
        """The ids of one stored sample: an SFT sample's prompt length comes first."""
        return self.seq_len + 1 if self.kind == "sft" else self.seq_len

    @property
    def samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    @functools.cached_property
    def shards_digest(self) -> str:
        """The shards' sha256s in manifest order, digested: a dataset prepared again into other
        shards keeps its name and sample count, not its order of samples."""
        return hashlib.sha256("".join(s["sha256"] for s in self.shards).encode()).hexdigest()[:16]

    def url(self, i: int) -> str:
        file = self.shards[i]["file"]
        if self.shards_url:
            return self.shards_url.replace("{shard}", file)
        return str(self.manifest.parent / file)


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    path = out_dir / MANIFEST
    atomic_write(path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return path


def load_manifest(path: str | Path, shards_url: Optional[str] = None,
                  key: str = "data.datasets.manifest") -> ShardSet:
    path = Path(path)
    if not path.is_file():
        raise DataConfigError(f"{key}: {path} not found (run `llada prepare` to create it)")
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError(f"a JSON {type(m).__name__}, not an object")
        if m.get("format") != FORMAT:
            raise ValueError(f"format is {m.get('format')!r}, expected {FORMAT!r}")
        if m.get("version") != VERSION:
            raise ValueError(f"version {m.get('version')} is not {VERSION}")
        tok = m["tokenizer"]
        s = ShardSet(name=m["name"], manifest=path, seq_len=int(m["seq_len"]), dtype=m["dtype"],
                     vocab_size=int(tok["vocab_size"]), special_ids=dict(tok["special_ids"]),
                     tokenizer_sha256=tok["sha256"], tokenizer_path=path.parent / tok["file"],
                     shards=list(m["shards"]), shards_url=shards_url,
                     kind=m.get("kind", "pretrain"))
        if s.kind not in KINDS:
            raise ValueError(f"kind {s.kind!r} is not one of {', '.join(KINDS)}")
        if not s.shards:
            raise ValueError("it lists no shard")
        if not all(isinstance(x, dict) and isinstance(x.get("file"), str)
                   and isinstance(x.get("samples"), int) and isinstance(x.get("bytes"), int)
                   and isinstance(x.get("sha256"), str) for x in s.shards):
            raise ValueError("a shard entry is not {file, samples, bytes, sha256, ...}")
        if s.special_ids.get("mask") is None:
            raise ValueError("its tokenizer has no mask token")
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError: a ValueError
        raise DataConfigError(f"{key}: {path} is not a valid manifest ({e})") from None
    return s


def _checked_row(shard_set: ShardSet, name: str, arr: np.ndarray) -> np.ndarray:
    """A held-out sample as int64, or ValueError naming it: the wrong shape, or (SFT) a prompt
    length that does not fit."""
    if arr.shape != (shard_set.sample_len,):
        raise ValueError(f"sample {name!r} has shape {arr.shape}, the manifest says "
                         f"({shard_set.sample_len},)")
    if shard_set.kind == "sft":
        from data_pipeline.sft import sft_sample_problem  # torch: not for prepare's workers

        problem = sft_sample_problem(arr, shard_set.seq_len)
        if problem:
            raise ValueError(f"sample {name!r}: {problem}")
    return arr.astype(np.int64)


def read_sequences(shard_set: ShardSet, count: Optional[int] = None) -> np.ndarray:
    """``count`` sequences spread evenly over a dataset (sample ``i * samples // count`` for i
    below count; all of them for None or a count as large), in manifest order, as one
    [n, sample_len] int64 array (an SFT set's rows: the prompt length, then the tokens:
    data_pipeline.sft.split_sft): a fixed held-out set read whole, not a training stream. Only the
    shards that hold a wanted sample are opened. A shard that cannot be read is bad input naming
    it (a held-out set with a hole would be another set, silently)."""
    total = shard_set.samples
    want = total if count is None else min(count, total)
    wanted = (np.arange(want, dtype=np.int64) * total) // want
    rows: List[np.ndarray] = []
    first = 0  # global index of the shard's first sample
    for i, shard in enumerate(shard_set.shards):
        lo, hi = np.searchsorted(wanted, [first, first + shard["samples"]])
        need = set((wanted[lo:hi] - first).tolist())
        first += shard["samples"]
        if not need:
            continue
        url = shard_set.url(i)
        try:
            index = 0
            for name, data in tar_members(read_shard(shard_set, i), url):
                if split_key(name)[1] != TOKENS_EXT:
                    continue
                if index in need:
                    rows.append(_checked_row(shard_set, name, decode_tokens(data)))
                index += 1
        except ShardError as e:
            raise DataConfigError(f"held-out set {shard_set.manifest}: {e}") from None
        except (OSError, ValueError) as e:
            raise DataConfigError(f"held-out set {shard_set.manifest}: {url}: {e}") from None
    if len(rows) < want:
        raise DataConfigError(f"held-out set {shard_set.manifest}: {len(rows)} of {want} "
                              f"sequences read (the shards hold fewer than the manifest lists)")
    return np.stack(rows)
