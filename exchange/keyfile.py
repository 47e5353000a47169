"""Key files on disk: private keys are PKCS#8 PEM, mode 0600, refused when others can read them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from crypto.errors import EncodingError
from crypto.keys import SigningKey, VerifyKey
from exchange.errors import KeyFileError


def write_private_key(path: Path, key: SigningKey) -> None:
    """Create ``path`` with mode 0600 (never overwrite an existing key)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_pem())


def write_public_key(path: Path, key: VerifyKey) -> None:
    try:
        path.write_bytes(key.to_pem())
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> SigningKey:
    """Load a private key, refusing one that the group or others may read or write."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    if info.st_mode & 0o077:
        raise KeyFileError(
            f"{path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        return SigningKey.from_pem(path.read_bytes())
    except EncodingError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc


def load_public_key(path: Path) -> VerifyKey:
    try:
        return VerifyKey.from_pem(path.read_bytes())
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    except EncodingError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
