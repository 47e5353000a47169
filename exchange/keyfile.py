"""Key files on disk: private keys are PKCS#8 PEM, mode 0600, refused when others can read them.

Every loader and writer takes a path as ``str`` or :class:`os.PathLike` (``"bank.key"`` or
``Path("bank.key")``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from crypto.errors import EncodingError
from crypto.keys import SigningKey, VerifyKey
from exchange.errors import KeyFileError

#: a path as a caller gives it
KeyPath = str | os.PathLike[str]

#: no PEM key comes near this; a larger file is not a key file
MAX_KEY_FILE_BYTES = 64 * 1024

_PUBLIC_PEM = b"-----BEGIN PUBLIC KEY-----"
_PRIVATE_PEM = b"-----BEGIN PRIVATE KEY-----"


def write_private_key(path: KeyPath, key: SigningKey) -> None:
    """Create ``path`` with mode 0600 (never overwrite an existing key)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot create {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as out:
        out.write(key.to_pem())


def write_public_key(path: KeyPath, key: VerifyKey) -> None:
    path = Path(path)
    try:
        path.write_bytes(key.to_pem())
    except OSError as exc:
        raise KeyFileError(f"cannot write {path}: {exc.strerror}") from exc


def _read_key_file(path: Path) -> tuple[bytes, int]:
    """The file's bytes and its permission bits."""
    try:
        info = path.stat()
    except FileNotFoundError as exc:
        raise KeyFileError(f"{path}: no such key file") from exc
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise KeyFileError(f"{path} is not a regular file")
    if info.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path} is {info.st_size} bytes: too large to be a PEM key file")
    try:
        return path.read_bytes(), stat.S_IMODE(info.st_mode)
    except OSError as exc:
        raise KeyFileError(f"{path}: {exc.strerror}") from exc


def load_private_key(path: KeyPath) -> SigningKey:
    """Load a private key, refusing one that the group or others may read or write.

    A public key file given by mistake is named as such (with what to give instead) rather
    than refused for its mode or as unparseable."""
    path = Path(path)
    data, mode = _read_key_file(path)
    if _PUBLIC_PEM in data and _PRIVATE_PEM not in data:
        raise KeyFileError(
            f"{path} holds a public key; give the private key instead "
            "(the .key file written by `zonex key new`, not the .pub)"
        )
    if mode & 0o077:
        raise KeyFileError(f"{path} is readable by others (mode {mode:04o}); run: chmod 600 {path}")
    try:
        return SigningKey.from_pem(data)
    except EncodingError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc


def load_public_key(path: KeyPath) -> VerifyKey:
    """Load a public key (a private key file is refused: it is never needed where a public
    key is asked for)."""
    path = Path(path)
    data, _ = _read_key_file(path)
    if _PRIVATE_PEM in data:
        raise KeyFileError(
            f"{path} holds a private key; give the public key instead "
            "(the .pub file written by `zonex key new`)"
        )
    try:
        return VerifyKey.from_pem(data)
    except EncodingError as exc:
        raise KeyFileError(f"{path}: {exc}") from exc
