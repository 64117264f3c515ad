"""The benchmark tools against a real Trident server on a tiny random model (CPU, a few seconds)."""
import asyncio
import json
import math

import httpx
import pytest

from trident.bench import quality, serve
from trident.bench.client import ServerTarget, resolve_model
from trident.bench.datasets import SampleRequest
from trident.bench.launch import free_port, launched_server, trident_command
from trident.bench.metrics import summarize
from trident.bench.perplexity import build_windows, perplexity
from trident.bench.runner import LoadConfig, run_load
from tests.tiny_model import build_tiny_hf_model

PPL_TEXT = ("The quick brown fox jumps over the lazy dog. Once upon a time there was a dragon who liked "
            "to read books in the library. Write a short poem about the sea. Explain why the sky is blue.")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return build_tiny_hf_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def server_url(tiny_model):
    port = free_port()
    with launched_server(trident_command(str(tiny_model), port), port, startup_timeout_s=120) as url:
        yield url


@pytest.fixture
def data_dir(tmp_path):
    """A small stand-in for the shared data folder, so the test does not depend on it."""
    tasks = [{"instruction": f"Write a short poem about the sea number {i}.",
              "instances": [{"input": "" if i % 2 else "the sky is blue", "output": "The sea is blue."}]}
             for i in range(6)]
    (tmp_path / "alpaca-seed-tasks.jsonl").write_text("".join(json.dumps(t) + "\n" for t in tasks))
    (tmp_path / "wikitext2-valid.txt").write_text((PPL_TEXT + "\n") * 20)
    return tmp_path


def test_load_generator_counts_successes_and_failures(server_url):
    ok = [SampleRequest(f"Once upon a time {i}", 0, 6) for i in range(4)]
    too_long = SampleRequest("The quick brown fox", 0, 100_000)   # beyond the context: HTTP 400
    config = LoadConfig(endpoint="completions", max_concurrency=2, ignore_eos=True, disable_tqdm=True)
    run = asyncio.run(run_load(ServerTarget(server_url), ok + [too_long], config))

    assert [r.success for r in run.records] == [True] * 4 + [False]
    for record in run.records[:4]:
        assert record.output_tokens == 6 and record.prompt_tokens > 0
        assert 1 <= len(record.chunk_times) <= 6
        assert record.start_time < record.chunk_times[0] <= record.chunk_times[-1]
    assert run.records[4].error.startswith("HTTP 400")
    summary = summarize(run.records, run.duration_s)
    assert (summary.completed, summary.failed, summary.total_output_tokens) == (4, 1, 24)
    assert list(summary.errors) == [run.records[4].error]
    assert summary.ttft.mean_ms > 0 and summary.e2el.mean_ms >= summary.ttft.mean_ms


@pytest.mark.parametrize("dataset", ["alpaca", "random"])
def test_serve_cli_writes_result(server_url, data_dir, tmp_path, dataset, capsys):
    result_file = tmp_path / "result.json"
    code = serve.main(["--base-url", server_url, "--data-dir", str(data_dir), "--dataset", dataset,
                       "--num-prompts", "3", "--random-input-len", "12", "--random-output-len", "4",
                       "--max-tokens", "4", "--ignore-eos", "--request-rate", "50", "--num-warmups", "1",
                       "--goodput", "ttft:60000", "--result-file", str(result_file), "--save-detailed",
                       "--disable-tqdm"])
    assert code == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    document = json.loads(result_file.read_text())
    summary = document["summary"]
    assert (summary["completed"], summary["failed"], summary["total_output_tokens"]) == (3, 0, 12)
    assert summary["request_goodput"] > 0 and len(document["requests"]) == 3
    assert document["config"]["dataset"] == dataset and "api_key" not in document["config"]


def test_serve_cli_reports_missing_data(server_url, tmp_path, capsys):
    assert serve.main(["--base-url", server_url, "--data-dir", str(tmp_path / "nowhere"), "--num-prompts", "1"]) == 1
    assert "--data-dir" in capsys.readouterr().err


def test_perplexity_matches_the_engine(server_url, tiny_model):
    from trident.engine.config import EngineConfig
    from trident.engine.llm import LLM

    async def measure():
        async with httpx.AsyncClient(timeout=60) as client:
            target = ServerTarget(server_url)
            model = await resolve_model(client, target)
            windows = await build_windows(client, target, model, PPL_TEXT, window=16, num_windows=3)
            return windows, await perplexity(client, target, model, windows)

    windows, result = asyncio.run(measure())
    assert windows.unit == "tokens" and [len(w) for w in windows.prompts] == [16, 16, 16]

    llm = LLM(EngineConfig(model=str(tiny_model)))
    assert sum(windows.prompts, []) == llm.tokenizer.encode(PPL_TEXT)[-48:]      # the held-out end
    nll = -sum(sum(llm.prompt_logprobs(w)) for w in windows.prompts)
    assert result.num_scored_tokens == 45
    assert result.nll_sum == pytest.approx(nll, rel=1e-4)
    assert result.perplexity == pytest.approx(math.exp(nll / 45), rel=1e-4)


def test_agreement_detects_disagreement_and_sweeps(server_url, data_dir, tmp_path, capsys):
    reference = tmp_path / "dense.json"
    common = ["--base-url", server_url, "--data-dir", str(data_dir), "--num-prompts", "3", "--max-tokens", "5",
              "--endpoint", "completions", "--window", "16", "--num-windows", "2", "--reference", str(reference)]
    assert quality.main(common + ["--save-reference"]) == 0
    result_file = tmp_path / "quality.json"
    assert quality.main(common + ["--result-file", str(result_file)]) == 0
    agreement = json.loads(result_file.read_text())["agreement"]
    # a sanity check only: the same server decoding greedily twice agrees with itself
    assert agreement["unit"] == "tokens" and agreement["mean_prefix_agreement"] == 1.0
    assert agreement["exact_match_rate"] == 1.0

    # The oracle: greedy decoding constrained to the top token (top_k 1) must still agree, while
    # sampling at temperature 2 (a seeded, near-uniform pick on a random model) must not.
    out = tmp_path / "sweep"
    assert quality.main(common + ["--sweep", 'topk1={"top_k": 1}', 'hot={"temperature": 2.0, "seed": 3}',
                                  f"url={server_url}", "--throughput-prompts", "2", "--output-dir", str(out)]) == 0
    points = {p["label"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert list(points) == ["topk1", "hot", "url"]
    assert all(p["failed"] == 0 and p["output_throughput"] > 0 for p in points.values())
    assert points["topk1"]["agreement"] == points["url"]["agreement"] == 1.0
    assert points["hot"]["agreement"] < 0.5
    assert len({p["perplexity"] for p in points.values()}) == 1     # prompt scoring ignores sampling options
    assert (out / "sweep.png").stat().st_size > 0 and "| topk1 |" in (out / "sweep.md").read_text()


def test_serve_cli_rejects_bad_paths_and_numbers_before_sending(tmp_path, data_dir, capsys):
    (tmp_path / "afile").write_text("")
    target = ["--base-url", "http://127.0.0.1:9", "--data-dir", str(data_dir)]     # nothing listens there
    for bad, message in ((["--result-file", str(tmp_path / "afile" / "r.json")], "afile"),
                         (["--burstiness", "inf"], "burstiness must be a positive number"),
                         (["--request-timeout", "0"], "request timeout must be positive")):
        assert serve.main([*target, *bad]) == 1
        assert message in capsys.readouterr().err
