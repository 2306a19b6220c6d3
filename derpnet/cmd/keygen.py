"""`derpconnect keygen` and `derpconnect pubkey`: make a private key file, show a public key."""

from __future__ import annotations

import argparse
import logging
import sys

from ..keys import PrivateKey
from .common import EXIT_OK, UserError, create_key_file, identity_path, key_file_arg, load_key, load_or_create_identity

log = logging.getLogger("derpnet.cmd")

NAME = "keygen"
HELP = "write a new private key file (mode 0600) and print its public key"
DESCRIPTION = """\
Write a new private key to PATH (default: the --key-file or --key location, i.e.
<user config dir>/derpconnect/derpconnect) with mode 0600, and print its public key on
stdout: first the 43-character base64url form the Go derpconnect uses, then nodekey:<hex>.
The file holds the raw 32 bytes (the Go tool's format) unless --text is given.
"""

PUBKEY_NAME = "pubkey"
PUBKEY_HELP = "print this node's public key (creating the key file on first use, like serve/join)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH", nargs="?", help="where to write the key")
    p.add_argument("--force", action="store_true", help="overwrite an existing key file")
    p.add_argument("--text", action="store_true", help="write privkey:<hex> text instead of raw bytes")


def add_pubkey_arguments(p: argparse.ArgumentParser) -> None:
    pass


def _print_public(key: PrivateKey) -> None:
    pub = key.public_key
    sys.stdout.write(f"{pub.b64()}\n{pub}\n")
    sys.stdout.flush()


def run(args: argparse.Namespace) -> int:
    path = key_file_arg(args.path, "keygen PATH") if args.path else identity_path(args)
    key = PrivateKey.generate()
    if path.is_dir():
        raise UserError(f"{path} is a directory")
    try:
        create_key_file(path, key, raw=not args.text, overwrite=args.force)
    except FileExistsError:
        raise UserError(f"{path} already exists (it may be this node's identity): use --force to replace "
                        f"it, or `derpconnect pubkey` to show its public key") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    log.info("wrote a new private key to %s (mode 0600)", path)
    _print_public(key)
    return EXIT_OK


def run_pubkey(args: argparse.Namespace) -> int:
    key, _ = load_or_create_identity(args)
    _print_public(key)
    return EXIT_OK


__all__ = ["run", "run_pubkey", "load_key"]
