"""CURVE key files for the optional tcp control endpoint: ZeroMQ's certificate format (a public
file NAME.key, a secret file NAME.key_secret holding both keys), written without a moment of being
readable by others, and refused when a secret file is readable by group or world."""

from __future__ import annotations

import datetime
import os
import stat
from pathlib import Path

import zmq
import zmq.auth

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
Z85_KEY_CHARS = 40


class KeyFileError(ValueError):
    """A key file that is missing, unreadable, malformed or too open; the message says which."""


def new_keypair(name: str, directory: str | os.PathLike) -> tuple[Path, Path, str]:
    """Write NAME.key (0644) and NAME.key_secret (0600) in `directory` (made 0700 if new); never
    overwrite. Returns (public file, secret file, public key as z85 text)."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise KeyFileError(f"key name {name!r}: use letters, digits, '-', '_', '.'")
    d = Path(directory).expanduser()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.curve_keypair()
    pub_path, sec_path = d / f"{name}{PUBLIC_SUFFIX}", d / f"{name}{SECRET_SUFFIX}"
    for p in (pub_path, sec_path):
        if p.exists() or p.is_symlink():
            raise KeyFileError(f"{p} exists; pick another name or remove it first")
    now = datetime.datetime.now().isoformat(timespec="seconds")
    _write(sec_path, 0o600, f"#   ZeroMQ CURVE **Secret** Certificate ({now}, lmx-supervisor)\n"
           "#   Keep it secret: whoever holds this file is this client.\n\n"
           f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n    secret-key = \"{secret.decode()}\"\n")
    _write(pub_path, 0o644, f"#   ZeroMQ CURVE Public Certificate ({now}, lmx-supervisor)\n\n"
           f"metadata\ncurve\n    public-key = \"{public.decode()}\"\n")
    return pub_path, sec_path, public.decode()


def _write(path: Path, mode: int, text: str) -> None:
    # O_EXCL: never through a symlink someone planted, never over an existing file; the mode is
    # set at creation, so the secret is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, mode)  # the umask may have taken bits from the public file's 0644


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    p = Path(path).expanduser()
    try:
        public, secret = zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{p}: not a readable ZeroMQ certificate ({exc})") from None
    for key in (public, secret):
        if key is not None and len(key) != Z85_KEY_CHARS:
            raise KeyFileError(f"{p}: a key is not {Z85_KEY_CHARS} z85 characters")
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    """The z85 public key of a .key (or .key_secret) file."""
    return _load(path)[0]


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys of a .key_secret file, which must be readable by its owner only."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise KeyFileError(f"{p}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"{p}: a secret key file must not be accessible to group or others "
                        f"(mode {stat.S_IMODE(mode):04o}; chmod 600 it)")
    public, secret = _load(p)
    if secret is None:
        raise KeyFileError(f"{p}: no secret-key in it (is this the public .key file?)")
    return public, secret


def _z85(value: str | bytes, what: str) -> bytes:
    key = value.encode() if isinstance(value, str) else bytes(value)
    if len(key) != Z85_KEY_CHARS:
        raise KeyFileError(f"{what}: expected {Z85_KEY_CHARS} z85 characters, got {len(key)}")
    return key


def client_keys(server_key: str | bytes | None, public_key: str | bytes | None, secret_key: str | bytes | None,
                client_cert: str | os.PathLike | None, server_key_file: str | os.PathLike | None
                ) -> tuple[bytes, bytes, bytes] | None:
    """(server public, client public, client secret) for a CURVE client, from z85 text or files;
    None when no key is given at all (ipc). Half a configuration is an error, never plain text."""
    given = [v for v in (server_key, public_key, secret_key, client_cert, server_key_file) if v]
    if not given:
        return None
    if server_key_file:
        server_key = load_public(server_key_file)
    if client_cert:
        public_key, secret_key = load_secret(client_cert)
    if not (server_key and public_key and secret_key):
        raise KeyFileError("CURVE needs the server's public key (server_key_file or curve_server_key) and this "
                           "client's keypair (client_cert, or curve_public_key + curve_secret_key)")
    return _z85(server_key, "server key"), _z85(public_key, "public key"), _z85(secret_key, "secret key")
