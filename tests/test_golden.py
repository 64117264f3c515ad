"""Golden test: greedy decoding of SmolLM2-135M-Instruct (float32) equals HF transformers token for
token on 10 instructions of the Alpaca seed set, both loading the same GGUF file: with every CPU GEMM
provider pinned, and with the dispatch this machine measures (`auto`), whose rounding may differ."""
import json

import pytest
import torch

from trident.engine.config import EngineConfig
from trident.engine.llm import LLM
from trident.engine.loader import resolve_model_path
from trident.engine.sampling_params import SamplingParams
from trident.kernels.cpu_gemm import PROVIDERS
from tests.conftest import DATA_DIR

NUM_PROMPTS, NEW_TOKENS = 10, 32


@pytest.fixture(scope="module")
def model_path():
    try:
        return resolve_model_path("smollm2-135m-instruct")
    except ValueError as e:
        pytest.fail(f"{e} (make test installs it)")


@pytest.fixture(scope="module")
def prompts_and_expected(model_path):
    """The prompts (chat-formatted token ids) and HF transformers' greedy continuations of them."""
    from transformers import AutoModelForCausalLM

    from trident.engine.tokenizer import Tokenizer
    from trident.engine.loader import load_checkpoint

    tokenizer = Tokenizer(load_checkpoint(str(model_path)).tokenizer_dir)
    lines = (DATA_DIR / "alpaca-seed-tasks.jsonl").read_text().splitlines()[:NUM_PROMPTS]
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": json.loads(l)["instruction"]}]))
               for l in lines]
    hf = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name,
                                              dtype=torch.float32).eval()
    expected = [hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=NEW_TOKENS, do_sample=False)[0, len(ids):].tolist() for ids in prompts]
    return prompts, expected


@pytest.mark.parametrize("cpu_gemm", ["auto", *PROVIDERS])
def test_greedy_matches_transformers(model_path, prompts_and_expected, cpu_gemm):
    prompts, expected = prompts_and_expected
    llm = LLM(EngineConfig(model=str(model_path), dtype="float32", cpu_gemm=cpu_gemm))
    ours = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    for prompt, out, want in zip(prompts, ours, expected):
        got = out.outputs[0].token_ids
        assert got == want[:len(got)], f"diverged on {llm.tokenizer.decode(prompt)!r}: {got} vs {want}"
        assert len(got) == len(want) or out.outputs[0].finish_reason == "stop"
