"""Roofline compute time of one op on one device.

time = max(FLOPs / (peak · compute_efficiency), bytes / (bandwidth · memory_efficiency))
       + kernel_latency   (for any op that does work)

Contractions are compute-bound, elementwise and data-movement ops memory-bound; the fixed
kernel latency keeps thousands of tiny ops from looking free.
"""

from __future__ import annotations

from cost_models.cluster import Device


def peak_flops(device: Device, dtype: str = "float32") -> float:
    """Peak FLOP/s for ``dtype``, falling back to float32 for dtypes the spec does not list."""
    return (
        device.peak_flops.get(dtype)
        or device.peak_flops.get("float32")
        or min(device.peak_flops.values())
    )


def op_time(flops: float, bytes_moved: float, device: Device, dtype: str = "float32") -> float:
    if flops <= 0 and bytes_moved <= 0:
        return 0.0
    compute = flops / (peak_flops(device, dtype) * device.compute_efficiency)
    memory = bytes_moved / (device.memory_bandwidth * device.memory_efficiency)
    return max(compute, memory) + device.kernel_latency
