import os

# GPTQModel's own loader (used here to write reference checkpoints) asks for 2 CPU workers and
# fails on a machine whose default pool has fewer; quantplug-gptqmodel's quantizer sets the same.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
