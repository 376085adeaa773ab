"""How much memory a run may use for images: the budget (``data.memory_budget``) and what the
machine has available, a container's cgroup limit included; and how many worker processes to
decode with by default. No imports beyond the standard library, so the spec can check a budget
without loading the image code."""

from __future__ import annotations

import ctypes
import os
import re
import sys
from functools import lru_cache
from pathlib import Path

DEFAULT_BUDGET_FRACTION = 0.5
#: blocks of this size and more are mapped and unmapped by glibc's malloc, never kept in its heap
MMAP_THRESHOLD_BYTES = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def available_memory() -> int:
    """Bytes this process can still use: the system's available memory, or less where a cgroup
    (a container, a systemd unit) limits it."""
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            candidates.append(8 << 30)
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        candidates.append(cgroup)
    return max(0, min(candidates))


def _cgroup_headroom(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit minus the working set of this process's cgroup (v2, else v1), if it has
    one: its usage less the page cache the kernel can drop (``inactive_file``), as Docker and the
    kubelet count it; reading a dataset's files fills that cache, and it is not used memory.
    On a hybrid host the v2 line has no memory files and the v1 memory line is read."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2
            folder = root / path.lstrip("/")
            limit, usage, inactive = folder / "memory.max", folder / "memory.current", "inactive_file"
        elif "memory" in controllers.split(","):
            folder = root / "memory" / path.lstrip("/")
            limit, usage = folder / "memory.limit_in_bytes", folder / "memory.usage_in_bytes"
            inactive = "total_inactive_file"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:
                return None
            return int(text) - max(0, int(usage.read_text().strip()) - _stat(folder / "memory.stat", inactive))
        except (OSError, ValueError):
            continue
    return None


def _stat(path: Path, name: str) -> int:
    """One counter of a cgroup's ``memory.stat`` (0 when it has none)."""
    try:
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == name:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.I)


def parse_budget(value: float | str | None) -> tuple[float | None, int | None]:
    """``(fraction, bytes)`` of a ``memory_budget``: a fraction of available memory (a number in
    (0, 1]) or a size (``"8GB"``, ``"512MiB"``, ``"2.5G"``); ``None`` is the default fraction.
    Raises ``ValueError`` with what is allowed."""
    if value is None:
        return DEFAULT_BUDGET_FRACTION, None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if 0 < value <= 1:
            return float(value), None
        raise ValueError(f"a number is a fraction of the available memory, in (0, 1]; got {value}; write a size "
                         f"with its unit, e.g. '8GB'")
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"'{value}' is not a size; write e.g. '8GB', '512MB', '2.5GiB', or a fraction such as 0.5")
    number, unit, binary, byte = match.groups()
    if binary and not unit:
        raise ValueError(f"'{value}' is not a size; write e.g. '8GB', '512MB', '2.5GiB', or a fraction such as 0.5")
    if not (unit or binary or byte):  # a number written as a string: a fraction, as numbers are
        return parse_budget(float(number))
    scale = (1024 if binary or not unit else 1000) ** " kmgt".index((unit or " ").lower())
    size = int(float(number) * scale)
    if size <= 0:
        raise ValueError(f"the memory budget must be above zero, got '{value}'")
    return None, size


def memory_budget(value: float | str | None = None, *, share: float = 1.0) -> tuple[int, str]:
    """The budget in bytes for a ``data.memory_budget`` value, and how it was reached (for the log).
    ``share`` is the part of the machine the process has (a Ray task's CPUs over its node's): a
    fraction of the available memory is scaled by it, so tasks side by side keep to it together;
    a size is what each process may hold."""
    fraction, size = parse_budget(value)
    if size is not None:
        return size, f"data.memory_budget {gb(size)}"
    available = available_memory()
    if share < 1:
        return int(fraction * share * available), (f"{fraction:.0%} of {gb(available)} available, times this "
                                                   f"task's share of the machine, {share:.3g}")
    return int(fraction * available), f"{fraction:.0%} of {gb(available)} available"


@lru_cache(maxsize=None)
def return_freed_batches() -> bool:
    """Have glibc's malloc serve every block of ``MMAP_THRESHOLD_BYTES`` or more by ``mmap``, so
    that a freed batch goes back to the system. Left to itself, glibc raises that threshold to
    the size of each large block freed, after which batch-sized blocks come from its heap, which
    fragments and grows: drawing 40,000 streamed 64 px images in batches of 256 (shifted, flipped
    and normalised) grew the process by 900 MB in 120 batches; with the threshold fixed it stayed
    within 15 MB. Called once a process streams images; inherited by the DataLoader workers it
    forks. Returns whether it applied (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """DataLoader workers when ``data.workers`` is not given: one per usable core, at most 8."""
    return min(8, usable_cpus())




def gb(nbytes: int) -> str:
    """``nbytes`` for a log line: GB from 100 MB up, MB below."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"
