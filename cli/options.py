"""What the commands share and can know without importing torch: the format and backend names (the library's
`formats.FORMATS` and `linear.BACKENDS`, checked equal by tests/test_structure.py) and how sizes are printed."""

FORMATS = ("nf4", "int8", "int4", "bf16", "fp16")
BACKENDS = ("auto", "torch", "triton", "bnb")


def fmt_bytes(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"
