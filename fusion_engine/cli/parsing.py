"""The command line's argparse: its errors are one line, raised as :class:`UsageError`."""

from __future__ import annotations

import argparse
import difflib

from ..errors import FusionEngineError


class UsageError(FusionEngineError):
    """A command line argparse refused: printed as one line, exit status 2."""


class CommandParser(argparse.ArgumentParser):
    """argparse, with its errors as one line (what is wrong, then where ``--help`` is) instead of
    the usage block and the error on two."""

    def error(self, message: str):
        import re

        bad = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if bad:
            choices = re.findall(r"'([^']*)'", bad.group(2))
            close = difflib.get_close_matches(bad.group(1), choices, n=1)
            if close:
                message += f"; did you mean '{close[0]}'?"
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")
