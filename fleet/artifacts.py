"""Content-addressed storage of package files.

A package file lives at ``root/<sha256>``, named by the SHA-256 of its bytes. Terminals
verify what they download against the sha256 in the desired state, so the name is also
the integrity check, and a stored file never changes: the HTTP server can hand out
strong ETags and let clients resume with byte ranges.

Files arrive through a temporary file in the same directory that is fsynced and then
renamed into place, so a reader sees either no file or the whole file, even after a
crash. Temporary names start with a dot and never look like a sha256, so they can never
be served.
"""

import hashlib
import io
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"[0-9a-f]{64}")

#: Read size while hashing and copying; large enough to stream at disk speed, small
#: enough that adding a multi-gigabyte firmware image costs a bounded amount of memory.
_COPY_CHUNK = 1024 * 1024

_TEMP_PREFIX = ".tmp-"


def is_sha256(value: str) -> bool:
    """Tell whether `value` is a sha256 as this store names files: 64 lowercase hex digits."""
    return _SHA256_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class StoredArtifact:
    """A file in the store: its name (sha256, lowercase hex) and its size in bytes."""

    sha256: str
    size: int


class ArtifactStore:
    """Package files named by their SHA-256, written atomically."""

    def __init__(self, root: Path) -> None:
        """Use `root` as the store's directory, creating it if needed.

        Args:
            root: Directory holding one file per artifact, named by its sha256.
        """
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    @property
    def root(self) -> Path:
        """The directory the artifacts live in."""
        return self._root

    def add_file(self, path: Path) -> StoredArtifact:
        """Copy a file into the store, streaming it so its size does not matter.

        Adding content that is already stored is harmless and returns the same result.

        Args:
            path: The file to add; it is read, never moved or changed.

        Returns:
            The stored artifact's sha256 and size.
        """
        with path.open("rb") as source:
            return self._add(source)

    def add_bytes(self, data: bytes) -> StoredArtifact:
        """Store `data`; adding content that is already stored is harmless.

        Args:
            data: The artifact's full content.

        Returns:
            The stored artifact's sha256 and size.
        """
        return self._add(io.BytesIO(data))

    def path_of(self, sha256: str) -> Path | None:
        """Return the path of a stored artifact, or None if there is no such artifact.

        The name is checked before the filesystem is touched, so a request for
        ``../../etc/passwd`` (or anything else that is not 64 lowercase hex digits)
        cannot reach outside the store.

        Args:
            sha256: The artifact's SHA-256 as 64 lowercase hex digits.

        Returns:
            The artifact's path if it is stored, else None.
        """
        if not is_sha256(sha256):
            return None
        path = self._root / sha256
        return path if path.is_file() else None

    def remove(self, sha256: str) -> None:
        """Delete a stored artifact no package refers to (nothing if it is not stored)."""
        path = self.path_of(sha256)
        if path is not None:
            path.unlink(missing_ok=True)
            self._fsync_root()
            logger.info("removed unused artifact %s", sha256)

    def _add(self, source: BinaryIO) -> StoredArtifact:
        # The temp file shares the final file's directory so the rename cannot cross
        # filesystems, which is what makes it atomic.
        fd, temp_name = tempfile.mkstemp(prefix=_TEMP_PREFIX, dir=self._root)
        temp = Path(temp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            with os.fdopen(fd, "wb") as target:
                # mkstemp creates 0600; artifacts are public downloads that other
                # processes (a separate web server, backups) may need to read.
                os.fchmod(target.fileno(), 0o644)
                while chunk := source.read(_COPY_CHUNK):
                    digest.update(chunk)
                    target.write(chunk)
                    size += len(chunk)
                target.flush()
                os.fsync(target.fileno())
            artifact = StoredArtifact(sha256=digest.hexdigest(), size=size)
            final = self._root / artifact.sha256
            if _has_size(final, size):
                # Same name means same content, so keep the file that may be being
                # served and drop the copy.
                temp.unlink()
                logger.debug("artifact %s already stored", artifact.sha256)
            else:
                temp.replace(final)
                self._fsync_root()
                logger.info("stored artifact %s (%d bytes)", artifact.sha256, size)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return artifact

    def _fsync_root(self) -> None:
        # The rename is durable only once the directory entry itself reaches the disk.
        fd = os.open(self._root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False
