"""Golden test: greedy decoding of SmolLM2-135M-Instruct (float32) equals HF transformers token for
token on 10 instructions of the Alpaca seed set, both loading the same GGUF file."""
import json

import pytest
import torch

from trident.engine.config import EngineConfig
from trident.engine.llm import LLM
from trident.engine.loader import resolve_model_path
from trident.engine.sampling_params import SamplingParams
from tests.conftest import DATA_DIR

NUM_PROMPTS, NEW_TOKENS = 10, 32


@pytest.fixture(scope="module")
def model_path():
    try:
        return resolve_model_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.fail(f"{e} (make test installs it)")


def test_greedy_matches_transformers(model_path):
    from transformers import AutoModelForCausalLM

    llm = LLM(EngineConfig(model=str(model_path), dtype="float32"))
    lines = (DATA_DIR / "alpaca-seed-tasks.jsonl").read_text().splitlines()[:NUM_PROMPTS]
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": json.loads(l)["instruction"]}])
               for l in lines]
    ours = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                              dtype=torch.float32).eval()
    for prompt, out in zip(prompts, ours):
        ids = llm.tokenizer.encode(prompt)
        expected = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist()
        got = out.outputs[0].token_ids
        assert got == expected[:len(got)], f"diverged on {prompt!r}: {got} vs {expected}"
        assert len(got) == len(expected) or out.outputs[0].finish_reason == "stop"
