"""Reading a layerwise dir: one safetensors file per layer, described by its manifest.

Layer files are read with their header parsed here (8-byte length, JSON) and the whole file read
in large chunks into a caller-owned flat byte buffer — on CUDA a reused pinned buffer — of which the
tensors are views (the header lands in front of them: workers/fileread.py). That costs at most one
copy from the page cache (none read direct) and no per-tensor allocation, and the same code runs on
CPU and GPU machines. A checksum, when asked for, is computed on a helper thread as the chunks land,
and checked before the tensors are returned.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from flexorch.contract.manifest import LayerEntry, Manifest, read_manifest
from flexorch.contract.shards import DENSE_PART
from flexorch.contract.verified import is_marked, mark, sha256_file
from flexorch.weights.compression import SCALE_SUFFIX
from flexorch.weights.layerformat import LayerFileHeader, LayerIntegrityError, TensorSpec, aligned, read_header
from flexorch.workers.fileread import advise_sequential, page_aligned, read_file


class BackgroundSha256:
    """sha256 of a file's chunks, hashed on a helper thread while the reader reads the next chunk.

    sha256 runs at ~1.8 GB/s (SHA-NI), about a disk's rate: hashed in the reading thread, a verifying
    cold read ran at half a plain one's rate (measured, benchmark 4); overlapped, it costs about
    max(read, hash) where a core is free. hashlib releases the GIL, so the two threads run at once.
    Chunks must stay unchanged until `hexdigest`.
    """

    def __init__(self):
        self._sha = hashlib.sha256()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flexorch-hash")  # one worker: in order
        self._pending: list[Future] = []

    def __enter__(self) -> "BackgroundSha256":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)  # on an error too: the caller's buffer is not hashed after we return

    def update(self, chunk: bytes | memoryview) -> None:
        self._pending.append(self._pool.submit(self._sha.update, chunk))

    def hexdigest(self) -> str:
        for done in self._pending:
            done.result()
        return self._sha.hexdigest()


def open_sequential(path: Path):
    """`path` opened unbuffered for one front-to-back read (fileread.advise_sequential)."""
    f = open(path, "rb", buffering=0)
    advise_sequential(f.fileno())
    return f


class LayerwiseModel:
    """A layerwise dir: its manifest, and its layers by name ("embed", "layer.3", "lm_head", ...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)
        self._headers: dict[str, LayerFileHeader] = {}
        self._verified: set[str] = set()  # files hashed (or marked, contract/verified.py): not hashed again
        self._scales_checked: set[str] = set()  # compressed layers whose scales were found finite

    def entry(self, name: str) -> LayerEntry:
        return self.manifest.entry(name)

    def stored_entry(self, name: str) -> LayerEntry:
        """The entry whose file holds `name`'s weights (a tied lm head's target)."""
        entry = self.entry(name)
        return self.entry(entry.tied_to) if entry.tied_to else entry

    def file_path(self, name: str) -> Path:
        return self.path / self.stored_entry(name).file

    def layer_bytes(self, name: str) -> int:
        """Bytes of the layer's file, from the manifest: nothing is read."""
        return self.stored_entry(name).bytes

    def header(self, name: str) -> LayerFileHeader:
        """The layer file's header, checked against the manifest's size (cached)."""
        stored = self.stored_entry(name)
        if stored.name not in self._headers:
            path = self.path / stored.file
            if not path.is_file():
                raise LayerIntegrityError(f"{path}: layer file {stored.name!r} is missing")
            actual = path.stat().st_size
            if actual != stored.bytes:
                raise LayerIntegrityError(
                    f"{path}: layer {stored.name!r} is {actual} bytes, the manifest says {stored.bytes}"
                )
            self._headers[stored.name] = read_header(path)
        return self._headers[stored.name]

    def data_bytes(self, name: str) -> int:
        return self.header(name).data_bytes

    def verify(self, name: str) -> None:
        """Check the layer file's size and sha256 against the manifest."""
        stored = self.stored_entry(name)
        self.header(name)
        self._matched(stored, sha256_file(self.path / stored.file))

    def read_into(self, name: str, buffer: torch.Tensor, verify: bool = False,
                  direct: bool = False) -> dict[str, torch.Tensor]:
        """Read layer `name`'s file into `buffer` (flat uint8, CPU, at least part_bytes(name, None)
        long) and return its tensors as views of the buffer, named relative to the layer (a tied
        head: {"weight"}).

        verify: hash the bytes as they are read (on a helper thread), the first time this object
        reads the file, unless it is marked as matching since (contract/verified.py); later passes
        over the model skip it. A mismatch raises before returning.
        direct: read around the page cache where that pays (fileread.read_file; `buffer` page-aligned).
        """
        entry, stored = self.entry(name), self.stored_entry(name)
        header = self.header(name)
        path, size = self.path / stored.file, header.data_offset + header.data_bytes
        try:
            if verify and not self._checked(stored):
                with BackgroundSha256() as digest:
                    read_file(path, size, buffer, direct, on_chunk=digest.update)
                    hexdigest = digest.hexdigest()
                self._matched(stored, hexdigest)
            else:
                read_file(path, size, buffer, direct)
        except EOFError:
            raise LayerIntegrityError(f"{path}: layer {stored.name!r} is truncated") from None
        data = header.data_offset
        tensors = {spec.name: buffer[data + spec.start:data + spec.end].view(spec.dtype).view(spec.shape)
                   for spec in header.tensors}
        self._check_scales(stored, tensors)
        if entry.tied_to:
            return {"weight": tensors["weight"]}
        return tensors

    def part_specs(self, name: str, experts: tuple[int, int] | None) -> tuple[TensorSpec, ...]:
        """What a shard step reads of layer `name` (Shard.experts): everything (None), the tensors
        but the fused experts ones (DENSE_PART), or experts first..end-1 of each fused tensor — expert
        e is slice [e], so a group is one contiguous range per tensor (start/end: its bytes in the
        data region; shape: the group's)."""
        header = self.header(name)
        if experts is None:
            return header.tensors
        entry = self.entry(name)
        if experts == DENSE_PART:
            return tuple(spec for spec in header.tensors if spec.name not in entry.expert_tensors)
        first, end = experts
        out = []
        for spec in header.tensors:
            if spec.name in entry.expert_tensors:
                per_expert = (spec.end - spec.start) // entry.experts
                out.append(TensorSpec(spec.name, spec.dtype, (end - first, *spec.shape[1:]),
                                      spec.start + first * per_expert, spec.start + end * per_expert))
        return tuple(out)

    def part_bytes(self, name: str, experts: tuple[int, int] | None) -> int:
        """Buffer bytes `read_part_into` needs: the whole file in pages (read_into), or each tensor
        starting ALIGN-aligned."""
        if experts is None:
            header = self.header(name)
            return page_aligned(header.data_offset + header.data_bytes)
        return sum(aligned(spec.end - spec.start) for spec in self.part_specs(name, experts))

    def read_part_into(self, name: str, experts: tuple[int, int] | None, buffer: torch.Tensor,
                       verify: bool = False, direct: bool = False) -> dict[str, torch.Tensor]:
        """`read_into` for one step of a streamed MoE layer (see part_specs): the ranges are read one
        by one into `buffer`; verify hashes the whole file once first (the ranges do not cover it)."""
        if experts is None:
            return self.read_into(name, buffer, verify=verify, direct=direct)
        stored = self.stored_entry(name)
        if verify:
            self._verify_once(name)
        path = self.path / stored.file
        data_offset = self.header(name).data_offset
        tensors, offset = {}, 0
        with open_sequential(path) as f:  # each range is one expert group of a tensor: large, in file order
            for spec in self.part_specs(name, experts):
                size = spec.end - spec.start
                _read_exactly(f, data_offset + spec.start, buffer[offset:offset + size], path, stored.name)
                tensors[spec.name] = buffer[offset:offset + size].view(spec.dtype).view(spec.shape)
                offset += aligned(size)
        self._check_scales(stored, tensors)
        return tensors

    def row_bytes(self, name: str) -> int:
        """Bytes of one row of layer `name`'s (rows, hidden) weight: an embedding or a head."""
        spec = self._weight_spec(name)
        return (spec.end - spec.start) // spec.shape[0]

    def read_rows_into(self, name: str, ranges: Sequence[tuple[int, int]], buffer: torch.Tensor,
                       verify: bool = False) -> torch.Tensor:
        """Rows first..end-1 of each range of layer `name`'s (rows, hidden) weight, read back to back
        into `buffer` (flat uint8, CPU): a (sum of the ranges' rows, hidden) view of it. The weight is
        row-major, so a range of rows is one contiguous range of bytes and one read. verify: as
        read_part_into (the ranges do not cover the file)."""
        stored = self.stored_entry(name)
        if verify:
            self._verify_once(name)
        spec, row = self._weight_spec(name), self.row_bytes(name)
        path, data_offset = self.path / stored.file, self.header(name).data_offset
        offset = 0
        # one range (a head's vocabulary step) is one long read; a gather's many short ones are left to
        # the kernel's default read-ahead, which a sequential hint would stretch over the gaps between them
        with (open_sequential(path) if len(ranges) == 1 else open(path, "rb", buffering=0)) as f:
            for first, end in ranges:
                size = (end - first) * row
                _read_exactly(f, data_offset + spec.start + first * row, buffer[offset:offset + size], path,
                              stored.name)
                offset += size
        return buffer[:offset].view(spec.dtype).view(offset // row, *spec.shape[1:])

    def _check_scales(self, stored: LayerEntry, tensors: dict[str, torch.Tensor]) -> None:
        """A compressed layer's scales are finite (quantize writes max |w| / QMAX): NaN or Inf, in a
        dir whose checksums were redone after damage or from a checkpoint holding them, would turn
        scores into NaN or silently wrong numbers. Once per file, as the checksum (the scales are
        1/16 of an int8 layer's bytes)."""
        scales = [name for name in tensors if name.endswith(SCALE_SUFFIX)]
        if stored.compression is None or not scales or stored.name in self._scales_checked:
            return
        bad = next((name for name in scales if not bool(torch.isfinite(tensors[name]).all())), None)
        if bad is not None:
            raise LayerIntegrityError(f"{self.path / stored.file}: layer {stored.name!r}: {bad} holds NaN or "
                                      "infinite scales (re-run `flexorch prepare`)")
        self._scales_checked.add(stored.name)

    def _verify_once(self, name: str) -> None:
        """Hash layer `name`'s whole file the first time a part of it is read (reads of parts do not
        cover the file, so they cannot hash as they go)."""
        if not self._checked(self.stored_entry(name)):
            self.verify(name)

    def _matched(self, stored: LayerEntry, digest: str) -> None:
        """Raise unless `digest` (of `stored`'s whole file) is the manifest's; then the file counts as
        verified, here and for later jobs (its mark)."""
        if digest != stored.sha256:
            raise LayerIntegrityError(
                f"{self.path / stored.file}: checksum mismatch for layer {stored.name!r} "
                "(the file changed after `flexorch prepare`; re-run it)"
            )
        self._verified.add(stored.name)
        mark(self.path, stored.file, stored.sha256)

    def _checked(self, stored: LayerEntry) -> bool:
        """Whether `stored`'s file was hashed by this object, or marked as matching and unchanged."""
        if stored.name not in self._verified and is_marked(self.path, stored.file, stored.sha256):
            self._verified.add(stored.name)
        return stored.name in self._verified

    def _weight_spec(self, name: str) -> TensorSpec:
        return next(spec for spec in self.header(name).tensors if spec.name == "weight")

    def load(self, name: str, verify: bool = False) -> dict[str, torch.Tensor]:
        """Read layer `name` into a fresh buffer (convenience for tests and tools)."""
        buffer = torch.empty(self.part_bytes(name, None), dtype=torch.uint8)
        return self.read_into(name, buffer, verify=verify)


def _read_exactly(f, offset: int, target: torch.Tensor, path: Path, layer: str) -> None:
    """Fill `target` (flat uint8, CPU) with the file's bytes from `offset`."""
    f.seek(offset)
    view, done = memoryview(target.numpy()), 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise LayerIntegrityError(f"{path}: layer {layer!r} is truncated")
        done += got
