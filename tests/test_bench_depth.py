"""The depth-axis benches end to end on the tiny model: files written, every row's fields present."""
import json

from trident.bench import early_exit, speculative


def test_the_speculative_bench_writes_its_table_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "spec"
    assert speculative.main(["--model", str(tiny_model_dir), "--instructions", "2", "--max-tokens", "6",
                             "--skips", "1", "--draft-tokens", "2", "--calibration-tokens", "256",
                             "--output-dir", str(out)]) == 0
    result = json.loads((out / "speculative.json").read_text())
    (row,) = result["rows"]
    assert row["b1_identical"] == 2 and row["b2_identical"] == 2          # lossless
    assert 0 <= row["acceptance"] <= 1 and row["free_draft_ceiling"] > 0
    assert (out / "speculative.png").stat().st_size > 0 and "| 1 layers" in (out / "speculative.md").read_text()


def test_the_early_exit_bench_writes_its_table_and_plot(tiny_model_dir, tmp_path):
    out = tmp_path / "exit"
    assert early_exit.main(["--model", str(tiny_model_dir), "--exit-layers", "1", "--thresholds", "0.0",
                            "--passages", "2", "--context", "16", "--tokens", "6", "--output-dir", str(out)]) == 0
    result = json.loads((out / "early_exit.json").read_text())
    forced = result["rows"][-1]
    assert forced["setting"] == "threshold 0.0" and forced["exit_rate"] == 1.0 and forced["mean_layers"] == 2.0
    assert 0 <= forced["token_agreement"] <= 1 and forced["perplexity_ratio"] > 0
    assert (out / "early_exit.png").stat().st_size > 0 and (out / "exit-plan.json").exists()
