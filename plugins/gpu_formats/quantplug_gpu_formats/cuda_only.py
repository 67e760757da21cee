"""``SpqrQuantizer`` and ``HiggsQuantizer``: refusals, on every device, before any tensor is read.

Neither method has anything that runs on a CPU to check a reader against:

- SpQR: spqr-quant (0.2.0) decodes its layers with CUDA kernels it compiles with nvcc on first use;
  even ``QuantizedLinear.dequantize()`` goes through that extension, and the host-side reference
  (``dequantize_compressed`` in ``spqr_cuda.cpp``) is compiled into the same CUDA extension, in a
  file that includes ``ATen/cuda/CUDAContext.h`` and ``cuda_runtime.h`` and computes in CUDA's host
  ``half`` type (``cuda_fp16.h``): it cannot be built without the CUDA toolkit.
- HIGGS: FLUTE packs the codes in a tile layout chosen per GPU (its SM count), and the input is
  rotated by fast-hadamard-transform's CUDA kernel; Transformers quantizes on load only on a GPU.

So quantplug runs neither (``Capabilities.devices`` is empty) and says, on any device, what the
method needs and what to do. ``validate_environment`` refuses first (``quantize`` and ``load`` call
it before touching a layer); ``empty_module`` / ``expected_tensors`` / ``load_module`` /
``quantize_module`` refuse the same way, for the paths that plan layers without naming one device
(``load(device_map=...)``) and for callers of the quantizer itself.
"""

from __future__ import annotations

from torch import nn

import quantplug

#: per method: what it is, what it needs, the Transformers call, why quantplug holds no reader
METHODS = {
    "spqr": {
        "label": "SpQR",
        "needs": (
            "a CUDA GPU with nvcc (spqr-quant compiles its CUDA kernels on first use), "
            "`pip install 'spqr_quant[gpu]' accelerate`, and Transformers: "
            "AutoModelForCausalLM.from_pretrained(path, device_map='cuda', dtype=torch.float16) "
            "(Transformers 5.25 calls QuantizedLinear.create_placeholder, which spqr-quant 0.2.0 spells "
            "create_placehodler: alias it before loading, as bench/gpu_checks.py does)"
        ),
        "no_reader": (
            "spqr-quant decodes only through its CUDA extension (its host-side dequantize reference is "
            "compiled into that extension), so nothing on a CPU can check a reader"
        ),
        "quantizer": (
            "SpQR's quantizer is the SpQR repository's calibrated main.py on CUDA GPUs; neither "
            "Transformers nor quantplug can call it"
        ),
    },
    "higgs": {
        "label": "HIGGS",
        "needs": (
            "a CUDA GPU, FLUTE (`pip install flute-kernel`: a CUDA wheel that requires vllm==0.7.2) and "
            "fast-hadamard-transform (`pip install fast-hadamard-transform`, built with nvcc), and "
            "Transformers: AutoModelForCausalLM.from_pretrained(path, device_map='cuda') for a HIGGS "
            "checkpoint, or from_pretrained(model, quantization_config=HiggsConfig(bits=4), "
            "device_map='cuda') to quantize on load (FLUTE takes only some layer shapes: Llama-3/3.1 "
            "8B/70B/405B, Gemma-2 9B/27B)"
        ),
        "no_reader": (
            "its weights are in FLUTE's tile-permuted bit-packed layout, chosen for the quantizing GPU's "
            "SM count and repacked for the local one after loading, behind a Hadamard rotation done by a "
            "CUDA kernel, so nothing on a CPU can check a reader"
        ),
        "quantizer": (
            "HIGGS quantizes through FLUTE's tune_and_pack, which reads the GPU's SM count and packs "
            "for it, and fast-hadamard-transform's CUDA kernel"
        ),
    },
}

_TODO = (
    "What to do: use a machine with a CUDA GPU and Transformers as above, or a checkpoint of another "
    "method, or quantize the original full-precision model with a method quantplug runs here "
    "(`quantplug select`)."
)


def refusal(method: str, device: str | None) -> str:
    """The whole message: the method, why not here, what it needs, what to do."""
    m = METHODS[method]
    where = f"on {device!r}" if device else "on any device"
    label = m["label"]
    if device == "cuda":
        why = f"quantplug-gpu-formats holds no {label} layers, for CUDA either (there Transformers and the library load it)"
    elif device is None:
        why = f"{label} runs only on a CUDA GPU, through Transformers and the library; quantplug holds no {label} layers"
    else:
        why = f"{label} runs only on a CUDA GPU"
    return (
        f"quantplug cannot load or quantize {m['label']} ({method!r}) {where}: {why}. Loading: "
        f"{m['no_reader']}. Quantizing: {m['quantizer']}. {m['label']} needs {m['needs']}. {_TODO}"
    )


class CudaOnlyQuantizer(quantplug.Quantizer):
    """Refuses every use, saying why, what the method needs and what to do (``refusal``)."""

    def _refuse(self, device: str | None) -> quantplug.BackendUnavailableError:
        return quantplug.BackendUnavailableError(refusal(self.config.quant_method, device))

    def validate_environment(self, device) -> None:
        raise self._refuse(str(device).split(":")[0])

    def needs_calibration(self) -> bool:
        return False  # never reached for quantizing (validate_environment refuses first)

    def quantize_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise self._refuse(module.weight.device.type)

    def empty_module(self, name: str, module: nn.Linear) -> nn.Module:
        raise self._refuse(None)

    def expected_tensors(self, name: str, module: nn.Linear):
        raise self._refuse(None)

    def load_module(self, name: str, module: nn.Linear, tensors) -> nn.Module:
        raise self._refuse(None)


class SpqrQuantizer(CudaOnlyQuantizer):
    config: quantplug.QuantConfig


class HiggsQuantizer(CudaOnlyQuantizer):
    config: quantplug.QuantConfig
