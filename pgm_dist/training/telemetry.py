"""GPU telemetry from nvidia-ml-py; every metric is simply absent where it cannot be read."""
from __future__ import annotations

import torch

GIB = 2**30


class GpuTelemetry:
    """Utilisation, memory, power and temperature of one GPU, found by UUID (NVML indices
    ignore CUDA_VISIBLE_DEVICES). On a machine without NVML, ``read()`` returns ``{}``."""

    def __init__(self, uuid: str | None):
        self.nvml = self.handle = None
        if uuid is None:
            return
        try:
            import pynvml
        except ImportError:
            return
        try:
            pynvml.nvmlInit()
            for index in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                found = pynvml.nvmlDeviceGetUUID(handle)
                found = found.decode() if isinstance(found, bytes) else found
                if found.removeprefix("GPU-") == uuid.removeprefix("GPU-"):
                    self.nvml, self.handle = pynvml, handle
                    return
        except pynvml.NVMLError:
            return

    @classmethod
    def for_device(cls, device: torch.device) -> "GpuTelemetry":
        if device.type != "cuda":
            return cls(None)
        return cls(str(torch.cuda.get_device_properties(device).uuid))

    def _try(self, fn, *args):
        try:
            return fn(self.handle, *args)
        except self.nvml.NVMLError:
            return None

    def read(self) -> dict[str, float]:
        if self.handle is None:
            return {}
        nv, values = self.nvml, {}
        util = self._try(nv.nvmlDeviceGetUtilizationRates)
        if util is not None:
            values["gpu/utilization_pct"] = float(util.gpu)
        mem = self._try(nv.nvmlDeviceGetMemoryInfo)
        if mem is not None:
            values["gpu/memory_used_gib"] = mem.used / GIB
            values["gpu/memory_total_gib"] = mem.total / GIB
        power = self._try(nv.nvmlDeviceGetPowerUsage)  # milliwatts
        if power is not None:
            values["gpu/power_w"] = power / 1000.0
        temperature = self._try(nv.nvmlDeviceGetTemperature, nv.NVML_TEMPERATURE_GPU)
        if temperature is not None:
            values["gpu/temperature_c"] = float(temperature)
        return values
