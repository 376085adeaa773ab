"""The ``--registry`` option, and the registry it names."""

from __future__ import annotations

import argparse


def registry_option(parser: argparse.ArgumentParser, *, json_option: bool = False) -> None:
    parser.add_argument("--registry", metavar="DIR", help="registry folder (default: $FUSION_ENGINE_REGISTRY or ./registry)")
    if json_option:
        parser.add_argument("--json", action="store_true", help="print JSON")


def open_registry(args, *, create: bool = False):
    from ..zoo import resolve_registry
    from ..zoo import Registry

    return Registry(resolve_registry(args.registry), create=create)
