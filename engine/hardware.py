"""What this machine's processor can do, for the choices training and serving make alike (torch imported inside)."""

from __future__ import annotations

from pathlib import Path


def cpu_has_bf16() -> bool:
    """True when this CPU computes bf16 matmuls natively (AMX or AVX512-BF16)."""
    import torch

    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):
        check = getattr(torch.cpu, probe, None)
        try:
            if check is not None and check():
                return True
        except Exception:
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags
