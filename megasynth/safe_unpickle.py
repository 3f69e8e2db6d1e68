"""Read a torch.distributed.checkpoint `.metadata` file without running code from it: `SafeFileSystemReader`
unpickles through an allow-list (docs/training.md, "No code runs on load").
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset({
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),  # maps a name like "torch.strided" to the layout object
    "torch": frozenset({"Size"}),  # and dtypes, checked by type below
    "pathlib": frozenset({"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"}),
    "collections": frozenset({"OrderedDict"}),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle references a class or function outside the allow-list; the message names it and the file."""


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that builds only DCP metadata objects (see _ALLOWED); anything else is refused."""

    def __init__(self, file, source: str | os.PathLike = "<stream>"):
        super().__init__(file)
        self.source = os.fspath(source)

    def find_class(self, module: str, name: str) -> Any:
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(f"refusing to unpickle {module}.{name} from {self.source}: a checkpoint's "
                                ".metadata holds only DCP metadata classes, so this file was not written by DCP "
                                "(or was tampered with)")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refusing to unpickle a persistent id from {self.source}")


def load_metadata(path: str | os.PathLike) -> Metadata:
    """The DCP Metadata pickled in `path`, built by RestrictedUnpickler. Raises UnsafePickleError on a
    disallowed reference and pickle.UnpicklingError / EOFError / OSError on a damaged or missing file."""
    with open(path, "rb") as f:
        metadata = RestrictedUnpickler(f, path).load()
    if not isinstance(metadata, Metadata):
        raise UnsafePickleError(f"{path}: expected DCP Metadata, found {type(metadata).__name__}")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader with `read_metadata` going through RestrictedUnpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        # Same as the parent's, minus the plain pickle.load (torch 2.x FileSystemReader.read_metadata).
        metadata = load_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
