"""`resattn masks` (being written)."""

from __future__ import annotations

import argparse

from ..errors import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)


def run(args: argparse.Namespace) -> int:
    raise UsageError("resattn masks is not available yet")
