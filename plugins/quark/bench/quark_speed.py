"""Load time and one-layer forward time of quantplug-quark against amd-quark's own modules.

    python plugins/quark/bench/quark_speed.py [--hidden 2048] [--repeat 20]

For each scheme: a one-block random Llama (hidden ``--hidden``, MLP 2.75x, float32) is quantized
by amd-quark's ``ModelQuantizer`` and exported by its ``export_safetensors``; then

- load: ``quantplug.load`` vs Transformers 5.25 ``from_pretrained`` (Quark's ``QParamsLinear``),
  median of 3, amd-quark already imported (its import is timed once, separately);
- forward of ``mlp.up_proj`` ([hidden -> 2.75 hidden]) on 1 row (decode) and 256 rows (prefill), in
  float32, median of ``--repeat`` calls, quantplug's ``QuarkLinear`` vs Quark's ``QParamsLinear``
  (outputs checked equal), and the dense ``nn.Linear`` for scale.

Needs amd-quark 0.13 (and g++ / ninja for its first import).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from quark_oracle import CONFIGS  # noqa: E402

import quantplug  # noqa: E402


def _median_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _export(config: dict, hidden: int, folder: Path) -> None:
    from quark.torch import ModelQuantizer, export_safetensors
    from quark.torch.quantization.config.config import QConfig
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=hidden,
            intermediate_size=hidden * 11 // 4,
            num_hidden_layers=1,
            num_attention_heads=hidden // 128,
            num_key_value_heads=hidden // 512,
            vocab_size=512,
            tie_word_embeddings=False,
        )
    ).eval()
    calibration = [
        torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(s)) for s in range(2)
    ]
    quantizer = ModelQuantizer(QConfig.from_dict(config))
    model = quantizer.freeze(quantizer.quantize_model(model, calibration))
    export_safetensors(
        model, folder, custom_mode="quark", weight_format="real_quantized", pack_method="reorder"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    t = time.perf_counter()
    import quark.torch  # noqa: F401

    print(f"import quark.torch: {time.perf_counter() - t:.1f} s (C++ extension already built)")
    from transformers import AutoModelForCausalLM

    rows = []
    root = Path(tempfile.mkdtemp(prefix="quark-bench-"))
    for name, config in CONFIGS.items():
        folder = root / name
        _export(config, args.hidden, folder)
        ours_load = statistics.median(
            _timed(lambda folder=folder: quantplug.load(folder, progress=False)) for _ in range(3)
        )
        hf_load = statistics.median(
            _timed(lambda folder=folder: AutoModelForCausalLM.from_pretrained(folder)) for _ in range(3)
        )
        ours = quantplug.load(folder, progress=False).model.layers[0].mlp.up_proj
        theirs = AutoModelForCausalLM.from_pretrained(folder).eval().model.layers[0].mlp.up_proj
        dense = torch.nn.Linear(ours.in_features, ours.out_features, bias=False)
        cells = [name, f"{ours_load:.2f}", f"{hf_load:.2f}"]
        for n in (1, 256):
            x = torch.randn(n, ours.in_features)
            with torch.no_grad():
                assert torch.equal(ours(x), theirs(x)), f"{name}: outputs differ"
                for layer in (ours, theirs, dense):
                    cells.append(f"{_median_time(lambda layer=layer, x=x: layer(x), args.repeat) * 1e3:.2f}")
        rows.append(cells)
    print(f"\nhidden {args.hidden}, {torch.get_num_threads()} threads; times: load s, forward ms (median)")
    head = ["scheme", "load quantplug", "load HF+Quark", "1 row ours", "1 row Quark", "1 row dense"]
    head += ["256 rows ours", "256 rows Quark", "256 rows dense"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
