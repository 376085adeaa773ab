"""How commands print: tables, JSON, sizes, counts, and messages on one line."""

from __future__ import annotations


def print_json(data) -> None:
    """``data`` as indented JSON, for reading: numpy values as numbers, anything else the codec
    cannot encode as its ``str``."""
    from ..jsoncodec import encode_json

    print(encode_json(data, indent=2, fallback=str))


def format_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def print_table(columns: list[str], rows: list[list], *, title: str | None = None) -> None:
    """A table on stdout. On a terminal long cells wrap; in a pipe or a file nothing is cut or
    wrapped, whatever the width."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=100_000)
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)


def format_count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def one_line(message: str) -> str:
    return " ".join(message.split())
