"""GGUF rope scaling: what the loader cannot run it refuses by name, never runs unscaled."""
from __future__ import annotations

import numpy as np
import pytest

from trident.engine.loader import CheckpointError, _gguf_config, _gguf_state_dict


def write_gguf(path, scaling_type: str | None = None, extra_tensor: str | None = None):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_head_count(2)
    w.add_vocab_size(4)
    w.add_feed_forward_length(8)
    w.add_context_length(64)
    if scaling_type is not None:
        w.add_rope_scaling_type(getattr(gguf.RopeScalingType, scaling_type.upper()))
        w.add_rope_scaling_factor(4.0)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    if extra_tensor:
        w.add_tensor(extra_tensor, np.ones(2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def test_linear_scaling_is_read(tmp_path):
    config = _gguf_config(write_gguf(tmp_path / "m.gguf", "linear"))
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    assert _gguf_config(write_gguf(tmp_path / "n.gguf")).rope_scaling is None


def test_yarn_scaling_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="rope scaling 'yarn'"):
        _gguf_config(write_gguf(tmp_path / "m.gguf", "yarn"))


def test_llama3_rope_freqs_is_refused_by_name(tmp_path):
    reader = write_gguf(tmp_path / "m.gguf", extra_tensor="rope_freqs.weight")
    with pytest.raises(CheckpointError, match="Llama 3 rope scaling"):
        _gguf_state_dict(reader, _gguf_config(reader))
