"""What this machine can hold, checked before a command allocates: host memory (what the
kernel says is available, within the process's cgroup limit), a CUDA device's free memory,
free disk space and CPU threads. A size that cannot fit is one line naming the flags that
set it, instead of a traceback from the allocator or the kernel's out-of-memory killer
half a minute later.

The estimates the commands pass are lower bounds of what they will allocate (the arrays
their shapes make certain), so a refusal is never a false alarm; a run that passes may
still need more.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from isae.errors import UserError

#: ``--threads`` beyond this many per CPU core is refused: more threads than cores only
#: slow torch down, and tens of thousands of them make it hang while it starts them.
THREADS_PER_CORE = 4


def check_threads(n: int) -> int:
    """``n`` as torch's thread count; UserError when below 1 or far beyond the cores."""
    if n < 1:
        raise UserError("--threads must be at least 1")
    cores = os.cpu_count() or 1
    if n > THREADS_PER_CORE * cores:
        raise UserError(f"--threads {n} is more than {THREADS_PER_CORE} x the {cores} CPU "
                        f"cores of this machine: use at most {cores}")
    return n


def fmt_bytes(n: float) -> str:
    """1.5e9 -> "1.5 GB" (powers of 1000, as df and free -H print them)."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> int | None:
    """Memory the kernel can give this process without swapping: MemAvailable of
    /proc/meminfo, capped by the room left under a cgroup's limit (a container, a Slurm
    job); None where neither can be read."""
    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:  # v1 writes ~2^63 for none
            found.append(max(lim - use, 0))
            break
    return min(found) if found else None


def device_available_bytes(device) -> int | None:
    """Free memory of a CUDA device (torch's count), the host's for the CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_available_bytes()


def check_memory(parts: dict[str, int], device, hint: str) -> None:
    """UserError when the sum of ``parts`` (label -> bytes, lower bounds) exceeds what
    ``device`` has available; ``hint`` says which flags lower it."""
    import torch

    need = sum(parts.values())
    have = device_available_bytes(device)
    if have is None or need <= have:
        return
    where = (f"{device} has {fmt_bytes(have)} free" if torch.device(device).type == "cuda"
             else f"the host has {fmt_bytes(have)} available")
    shown = ", ".join(f"{label} {fmt_bytes(b)}" for label, b in
                      sorted(parts.items(), key=lambda kv: -kv[1]) if b)
    raise UserError(f"this needs at least {fmt_bytes(need)} of memory ({shown}), but {where}: "
                    f"{hint}")


def check_disk(need: int, folder: str | os.PathLike, hint: str) -> None:
    """UserError when writing ``need`` bytes (a lower bound) under ``folder`` (its nearest
    existing parent) cannot fit in the free space of its file system."""
    folder = Path(os.path.abspath(folder))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need > free:
        raise UserError(f"this writes at least {fmt_bytes(need)}, but the disk holding {folder} "
                        f"has {fmt_bytes(free)} free: {hint}")
