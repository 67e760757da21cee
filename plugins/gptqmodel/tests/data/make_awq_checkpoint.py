"""Writes tests/data/awq-tiny: a tiny random Llama quantized to AWQ's gemm layout by auto-round
(``quantize_and_save(format="auto_awq")``), the CPU tool that writes AWQ checkpoints (GPTQModel's
AWQ quantizer needs CUDA). Its full-precision original is rebuilt by the tests from the same seed
(``quantplug.testing.tiny_llama()``). Run in an environment with auto-round 0.16:

    python plugins/gptqmodel/tests/data/make_awq_checkpoint.py
"""

import shutil
import tempfile
from pathlib import Path

from auto_round import AutoRound
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from quantplug.testing import tiny_llama, token_ids

OUT = Path(__file__).resolve().parent / "awq-tiny"
VOCAB = 384

tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
tk.pre_tokenizer = pre_tokenizers.Whitespace()
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="t0", pad_token="t1", eos_token="t2")
model = tiny_llama()
model.config.architectures = ["LlamaForCausalLM"]  # what save_pretrained records; auto-round writes []
data = [token_ids(VOCAB, (1, 32), seed=100 + i) for i in range(16)]
ar = AutoRound(
    model, tokenizer, bits=4, group_size=32, sym=False, iters=20, nsamples=16, seqlen=32, batch_size=4,
    dataset=data, device_map="cpu", enable_torch_compile=False,
)  # fmt: skip
with tempfile.TemporaryDirectory() as tmp:
    ar.quantize_and_save(tmp, format="auto_awq")
    (written,) = {p.parent for p in Path(tmp).rglob("config.json")}  # auto-round may add a subfolder
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(written / name, OUT / name)
print(sorted(p.name for p in OUT.iterdir()), (OUT / "model.safetensors").stat().st_size)
