"""Resources as users write them: sizes ('16GiB', '2GB', or bytes) and devices ('auto', 'cpu', 'cuda:N').

One parser each, shared by the quantizer, the plan, the loader and the offloader (sizes through accelerate)."""

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
