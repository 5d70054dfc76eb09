"""Resources as users write them: sizes ('16GiB', '2GB', or bytes) and devices ('auto', 'cpu', 'cuda:N'), and the
bytes a module holds on its device. One parser each, shared by the quantizer, the plan, the loader and the offloader
(sizes through accelerate); they live here, below all of them, so that none imports another for them."""

from __future__ import annotations

import torch


def parse_size(size: int | str, name: str = "size") -> int:
    """'16GiB' / '2GB' / 500000000 -> bytes, positive; `name` is how the error message calls the value."""
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise ValueError(f"{name} {size!r}: give bytes as an int or a size like '16GiB'")
    if isinstance(size, str):
        from accelerate.utils import convert_file_size_to_int

        try:
            n = convert_file_size_to_int(size.strip())
        except (ValueError, TypeError):
            raise ValueError(f"{name} {size!r} not understood: write it like 16GiB, 24GB or 500MB") from None
    else:
        n = size
    if not isinstance(n, int) or n <= 0:
        raise ValueError(f"{name} {size!r} must be a positive size like 16GiB")
    return n


def parse_max_memory(max_memory: int | str | None) -> int | None:
    """A device memory budget in bytes from an int or a size string ('16GiB', '24GB'); None = no budget."""
    return None if max_memory is None else parse_size(max_memory, "max_memory")


def resolve_device(device: str | torch.device) -> torch.device:
    """'auto' -> cuda when available, else cpu; cpu, cuda and cuda:N as given, if present here."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda (cuda:N)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: choose auto, cpu or cuda (cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available here; use --device cpu")
    return dev


def tracked_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (views counted once)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())
