import hashlib
import os
from pathlib import Path

import pytest

from fleet.artifacts import ArtifactStore, StoredArtifact, is_sha256


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "store")


def test_add_bytes_names_file_by_sha256(store: ArtifactStore) -> None:
    data = b"firmware image"
    artifact = store.add_bytes(data)
    assert artifact == StoredArtifact(hashlib.sha256(data).hexdigest(), len(data))
    path = store.path_of(artifact.sha256)
    assert path == store.root / artifact.sha256
    assert path.read_bytes() == data


def test_add_empty(store: ArtifactStore) -> None:
    artifact = store.add_bytes(b"")
    assert artifact == StoredArtifact(hashlib.sha256(b"").hexdigest(), 0)
    assert store.path_of(artifact.sha256) is not None


def test_add_file_streams_large_file(store: ArtifactStore, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    source = tmp_path / "pkg.bin"
    source.write_bytes(data)
    artifact = store.add_file(source)
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert artifact.size == len(data)
    assert source.read_bytes() == data
    path = store.path_of(artifact.sha256)
    assert path is not None
    assert path.read_bytes() == data
    assert store.add_bytes(data) == artifact


def test_add_is_idempotent_and_keeps_existing_file(store: ArtifactStore) -> None:
    first = store.add_bytes(b"same")
    inode = (store.root / first.sha256).stat().st_ino
    second = store.add_bytes(b"same")
    assert second == first
    assert [p.name for p in store.root.iterdir()] == [first.sha256]
    assert (store.root / first.sha256).stat().st_ino == inode


def test_truncated_existing_file_is_replaced(store: ArtifactStore) -> None:
    data = b"0123456789"
    sha = hashlib.sha256(data).hexdigest()
    (store.root / sha).write_bytes(data[:3])
    store.add_bytes(data)
    assert (store.root / sha).read_bytes() == data


def test_write_is_atomic_rename_from_same_directory(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"x" * 5000
    seen: list[tuple[Path, Path, bytes, bool]] = []
    real_replace = Path.replace

    def spy(self: Path, target: Path) -> Path:
        seen.append((self, Path(target), self.read_bytes(), Path(target).exists()))
        return real_replace(self, target)

    monkeypatch.setattr(Path, "replace", spy)
    artifact = store.add_bytes(data)
    [(source, target, content, target_existed)] = seen
    assert source.parent == store.root
    assert source.name.startswith(".")
    assert not is_sha256(source.name)
    assert target == store.root / artifact.sha256
    assert content == data
    assert not target_existed
    assert not source.exists()
    assert oct((store.root / artifact.sha256).stat().st_mode & 0o777) == oct(0o644)


def test_failed_write_leaves_nothing(store: ArtifactStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        store.add_bytes(b"data")
    assert list(store.root.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "..",
        "",
        "a" * 63,
        "a" * 65,
        "A" * 64,
        "g" * 64,
        "a" * 63 + "/",
        "/" + "a" * 63,
        "a" * 64 + "\n",
        ".tmp-abcdef",
    ],
)
def test_path_of_rejects_bad_names_without_touching_disk(
    store: ArtifactStore, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("filesystem touched")

    monkeypatch.setattr(Path, "is_file", forbidden)
    monkeypatch.setattr(Path, "exists", forbidden)
    monkeypatch.setattr(Path, "stat", forbidden)
    monkeypatch.setattr(os, "stat", forbidden)
    assert store.path_of(name) is None


def test_path_of_unknown_sha(store: ArtifactStore) -> None:
    assert store.path_of("0" * 64) is None


def test_path_of_ignores_directories(store: ArtifactStore) -> None:
    (store.root / ("1" * 64)).mkdir()
    assert store.path_of("1" * 64) is None
