import os

# Transformers' BitNet reference functions are decorated with @torch.compile; on a CPU that builds C++
# with inductor for minutes. Eager mode computes the same reference.
os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
