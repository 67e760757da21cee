"""The device to plan or measure for: its type, name, CUDA compute capability and memory.

``detect_hardware`` with a device given imports torch only for CUDA on a machine that may have
CUDA devices; ``cpu_hardware`` never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path

from .errors import ConfigError
from .sizes import fmt_bytes


@dataclasses.dataclass(frozen=True)
class Hardware:
    device: str
    """torch device type: ``cpu``, ``cuda``, ``mps``."""
    name: str = ""
    cuda_capability: tuple[int, int] | None = None
    memory_bytes: int | None = None
    detected: bool = True

    def describe(self) -> str:
        bits = [self.device]
        if self.name:
            bits.append(self.name)
        if self.cuda_capability:
            bits.append(f"compute capability {self.cuda_capability[0]}.{self.cuda_capability[1]}")
        if self.memory_bytes:
            bits.append(f"{fmt_bytes(self.memory_bytes)} memory")
        if self.detected:
            return ", ".join(bits)
        # the device type was given; any name or memory shown was read from this machine
        details = self.name or self.memory_bytes or self.cuda_capability
        return ", ".join(bits) + (
            " (device given; details read from this machine)" if details else " (given)"
        )


def detect_hardware(device: Hardware | str | None = None) -> Hardware:
    """The device to reason about: ``device`` when given (``"cpu"``, ``"cuda"``, ``"cuda:1"``,
    ``"mps"``, or a ``Hardware`` describing another machine), else the best one torch sees (CUDA,
    then MPS, then the CPU)."""
    if isinstance(device, Hardware):
        return device
    if device is not None:
        return _given(device)
    import torch

    if torch.cuda.is_available():
        return _cuda_hardware(torch.cuda.current_device(), True)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return Hardware("mps", "Apple GPU", None, None, True)
    return cpu_hardware(True)


def cpu_hardware(detected: bool = True) -> Hardware:
    """This machine's CPU: its model name (from /proc/cpuinfo, "" elsewhere) and physical memory."""
    name = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware("cpu", name, None, mem, detected)


def _given(device: str) -> Hardware:
    kind, _, index = str(device).partition(":")
    kind = kind.strip().lower()
    if kind == "cpu":
        return cpu_hardware(False)
    if kind == "cuda":
        if "torch" in sys.modules or _torch_cuda_available():
            import torch

            if torch.cuda.is_available():
                return _cuda_hardware(int(index or 0), False)
        return Hardware("cuda", "", None, None, False)
    if not kind or not kind.isidentifier() or not _known_device_type(kind):
        hint = "did you mean 'cuda'? " if kind in ("gpu", "nvidia", "cuda0") else ""
        raise ConfigError(
            f"device {device!r} is not a torch device type; {hint}use cpu, cuda, cuda:N, mps, or a type "
            f"a backend declares ({', '.join(sorted(_declared_device_types())) or 'none installed'})",
            field="device",
            value=device,
            allowed=sorted(TORCH_DEVICE_TYPES | _declared_device_types()),
        )
    return Hardware(kind, "", None, None, False)


#: torch's device types (``torch.device("<type>")``), named here so ``select`` needs no torch
TORCH_DEVICE_TYPES = frozenset(
    {"cpu", "cuda", "mps", "xpu", "hpu", "mtia", "xla", "ipu", "meta", "privateuseone", "npu", "maia"}
)


def _declared_device_types() -> set[str]:
    from .dispatch import backends

    return {d for b in backends() for d in b.capabilities.devices}


def _known_device_type(kind: str) -> bool:
    """A torch device type, or one a registered backend declares (a plugin's custom device)."""
    return kind in TORCH_DEVICE_TYPES or kind in _declared_device_types()


def _cuda_hardware(index: int, detected: bool) -> Hardware:
    import torch

    props = torch.cuda.get_device_properties(index)
    return Hardware("cuda", props.name, (props.major, props.minor), props.total_memory, detected)


def _torch_cuda_available() -> bool:
    """Whether CUDA devices may exist, without importing torch (then torch is asked)."""
    return os.path.exists("/dev/nvidiactl") or bool(os.environ.get("CUDA_VISIBLE_DEVICES"))
