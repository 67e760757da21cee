import os

import pytest

# GPTQModel's own loader (used here to write reference checkpoints) asks for 2 CPU workers and
# fails on a machine whose default pool has fewer; quantplug-gptqmodel's quantizer sets the same.
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")


@pytest.fixture(scope="session")
def written_by_gptqmodel(tmp_path_factory):
    """Tiny Llamas quantized and saved by GPTQModel's own API: {kind: (full-precision folder, its
    GPTQ checkpoint)}: v1 and v2 layouts, each with and without act-order, symmetric and
    asymmetric, and 8 bits."""
    from test_gptq import _gptqmodel_checkpoint

    root = tmp_path_factory.mktemp("gptqmodel")
    kinds = {
        "v1-sym": dict(sym=True, format="gptq"),
        "v1-asym": dict(sym=False, format="gptq"),
        "v1-act-order-sym": dict(sym=True, desc_act=True, format="gptq"),
        "v1-act-order-asym": dict(sym=False, desc_act=True, format="gptq"),
        "v2-sym": dict(sym=True, format="gptq_v2"),
        "v2-asym": dict(sym=False, format="gptq_v2"),
        "v2-act-order-sym": dict(sym=True, desc_act=True, format="gptq_v2"),
        "v2-act-order-asym": dict(sym=False, desc_act=True, format="gptq_v2"),
        "v1-8bit": dict(bits=8, group_size=-1, sym=True, format="gptq", act_group_aware=False),
    }
    return {
        kind: _gptqmodel_checkpoint(root, kind, **{"bits": 4, "group_size": 32, **settings})
        for kind, settings in kinds.items()
    }
