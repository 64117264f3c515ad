import os
import sys
from pathlib import Path

import pytest

from trident.bench.datasets import default_data_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA_DIR = default_data_dir()          # the data shipped inside the repository (bench/data/)
# Keep test runs from writing into the user's cache.
os.environ.setdefault("TRIDENT_CACHE_DIR", str(ROOT / ".cache" / "trident"))
# One GEMM form for every decode-sized product, whatever this CPU measures fastest: a sequence's
# logits are then the same bit for bit alone or in any batch, which the bit-exact pruning tests
# compare, and every CPU runs the same arithmetic. tests/test_linear.py and the golden test run the
# measured dispatch itself.
os.environ.setdefault("TRIDENT_CPU_GEMM", "torch-wm-pad")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_hf_model

    return build_tiny_hf_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_gguf(tiny_model_dir, tmp_path_factory) -> Path:
    from tests.tiny_model import build_tiny_gguf

    return build_tiny_gguf(tiny_model_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


@pytest.fixture
def dispatch():
    """The process's CPU GEMM dispatch, emptied of earlier engines' choices and restored after the
    test (the rest of the suite relies on the pinned provider)."""
    from trident.kernels import cpu_gemm

    saved = (cpu_gemm.DISPATCH.pinned, cpu_gemm.DISPATCH.choices)
    cpu_gemm.DISPATCH.choices = {}
    yield cpu_gemm.DISPATCH
    cpu_gemm.DISPATCH.pinned, cpu_gemm.DISPATCH.choices = saved
