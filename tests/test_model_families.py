"""Each model family the README lists, as a tiny random model, against HF transformers: prompt
logprobs equal position by position, from the HF folder and (where the loader reads it) from GGUF.

Config files are written the way transformers 5 writes them: rope scaling only under
`rope_parameters`, `attention_bias` null for Qwen2, a sliding window for Mistral."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_model import PROMPTS, hf_model, make_llm
from tests.tiny_model import build_tiny_gguf, build_tiny_hf_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
CASES = {   # name: (family, config overrides, formats)
    "llama3-rope": ("llama", {"rope_scaling": LLAMA3}, ("hf",)),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}, ("hf", "gguf")),
    "qwen2-biases": ("qwen2", {}, ("hf", "gguf")),
    "mistral": ("mistral", {}, ("hf", "gguf")),
}


def as_transformers_writes_it(path, overrides) -> None:
    cfg = json.loads((path / "config.json").read_text())
    if "rope_scaling" in overrides:          # transformers 5 keeps it under rope_parameters only
        cfg["rope_parameters"] = {**overrides["rope_scaling"], "rope_theta": cfg["rope_theta"]}
        del cfg["rope_scaling"]
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("case, fmt", [(case, fmt) for case, (_, _, fmts) in CASES.items() for fmt in fmts])
def test_family_logits_equal_hf(case, fmt, tmp_path):
    family, overrides, _ = CASES[case]
    hf_dir = build_tiny_hf_model(tmp_path / case, seed=1, family=family, **overrides)
    as_transformers_writes_it(hf_dir, overrides)
    ref = hf_model(hf_dir)
    if family == "qwen2":
        assert ref.model.layers[0].self_attn.q_proj.bias.abs().sum() > 0        # the biases are there
    if "rope_scaling" in overrides:
        assert ref.config.rope_parameters["rope_type"] == overrides["rope_scaling"]["rope_type"]
    llm = make_llm(hf_dir if fmt == "hf" else build_tiny_gguf(hf_dir, tmp_path / f"{case}.gguf"))
    for prompt in PROMPTS:
        ids = llm.tokenizer.encode(prompt)
        ours = torch.tensor(llm.prompt_logprobs(ids))
        with torch.no_grad():
            expected = ref(torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        expected = expected.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_a_sliding_window_caps_the_context():
    """The model code attends to the whole context, so a window shorter than it becomes the limit."""
    from tests.tiny_model import tiny_config
    from trident.engine.loader import config_from_hf

    base = {**tiny_config(400), "model_type": "mistral"}
    assert config_from_hf({**base, "sliding_window": 16}).max_position_embeddings == 16
    assert config_from_hf({**base, "sliding_window": 4096}).max_position_embeddings == 512
    assert config_from_hf({**base, "sliding_window": 16, "use_sliding_window": False}).max_position_embeddings == 512
