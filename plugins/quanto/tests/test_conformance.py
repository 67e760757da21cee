"""The conformance kit for quanto: int8 / int4 / int2 / float8 weights, int8 weights with
calibrated int8 activations, and float8 weights with calibrated float8 activations.

The kit quantizes without calibration data; activation configs need it, so for those this class
passes ``calibration_data`` (``_quantized_model``) and calibrates the one-layer check through
``quantplug.quantize`` on a one-layer model. Every other check is the kit's, unchanged.
"""

import torch

import quantplug
from quantplug.testing import BackendConformance

CALIBRATED = {"weights": "int8", "activations": "int8"}


def calibration_ids(vocab: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, vocab, (2, 16), generator=gen) for _ in range(2)]


class TestQuantoConformance(BackendConformance):
    backend_name = "quanto"
    configs = [
        ({"weights": "int8"}, 8),
        ({"weights": "int4"}, 4),
        ({"weights": "int2"}, 2),
        ({"weights": "float8"}, 8),
        (CALIBRATED, 8),
        ({"weights": "float8", "activations": "float8"}, 8),
    ]
    bad_configs = [
        ({"weights": "int3"}, "weights"),
        ({"weights": 4}, "weights"),
        ({"activations": "int4"}, "activations"),
        ({"activations": True}, "activations"),
    ]
    library_modules = ("optimum", "optimum.quanto")

    def _quantized_model(self, config):
        if not config.get("activations"):
            return super()._quantized_model(config)
        model = self.make_model().to(self.device)
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        ids = ids.to(self.device)
        with torch.no_grad():
            ref = model(ids).logits
        report = quantplug.quantize(
            model,
            self.make_config(config),
            progress=False,
            calibration_data=calibration_ids(model.config.vocab_size),
        )
        return model, ids, ref, report

    def test_layer_error_and_bytes(self, case):
        config, bits = case
        if not config.get("activations"):
            return super().test_layer_error_and_bytes(case)
        # The kit's check, with the layer calibrated on other inputs of the same distribution.
        bound = quantplug.get_backend(self.backend_name).capabilities.max_rel_error[bits]
        torch.manual_seed(0)
        layer = torch.nn.Linear(512, 256, bias=True, device=self.device)
        torch.nn.init.normal_(layer.weight, std=0.02)
        x = torch.randn(32, 512, device=self.device)
        with torch.no_grad():
            ref = layer(x)
        model = torch.nn.Sequential(layer)
        calib = [torch.randn(32, 512, device=self.device) for _ in range(4)]
        quantplug.quantize(model, self.make_config(config), progress=False, calibration_data=calib)
        qlayer = model[0]
        with torch.no_grad():
            out = qlayer(x)
        rel = ((out.float() - ref).norm() / ref.norm()).item()
        assert rel <= bound, f"relative output error {rel:.4f} exceeds the declared bound {bound}"
        stored = model.quantplug_info.quantizer.module_tensors("0", qlayer)
        weight_bits = (
            8 * sum(t.numel() * t.element_size() for k, t in stored.items() if k != "bias") / 512 / 256
        )
        assert bits <= weight_bits <= bits + self.max_overhead_bits
