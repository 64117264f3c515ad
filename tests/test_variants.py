"""Several plans served by one engine (`--plans`): each request picks its plan by profile, and
sequences of different plans share one scheduler, one KV cache and one step."""
import pytest

from trident.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from trident.engine.llm import LLM
from trident.engine.loader import load_checkpoint
from trident.engine.pruning.length import RequestPruning
from trident.engine.pruning.plan import PruningPlan
from trident.engine.sampling_params import SamplingParams
from trident.engine.sequence import Sequence


@pytest.fixture(scope="module")
def plan_files(tiny_model_dir, tmp_path_factory):
    config = load_checkpoint(str(tiny_model_dir)).config
    folder = tmp_path_factory.mktemp("variant-plans")
    width = PruningPlan.dense(config)
    width.name = "narrow"
    width.layers[0].kept_q_heads = [2, 3]            # only KV head 1 stays in layer 0: a narrower cache view
    width.layers[0].kept_kv_heads = [1]
    width.layers[2].kept_ffn_channels = list(range(0, 96, 2))
    depth = PruningPlan.dense(config)
    depth.name = "shallow"
    depth.layers[1].keep = False
    lossless = PruningPlan.dense(config)                # as `trident plan` writes its lossless profile
    lossless.name = "lossless"
    lossless.layers[3].kept_ffn_channels = list(range(48))   # (sliced here, so running it shows)
    budget = PruningPlan.dense(config)
    budget.name = "budget"
    budget.length.decode_sinks, budget.length.decode_recent, budget.length.decode_heavy = 2, 6, 4
    paths = {}
    for plan in (width, depth, budget, lossless):
        paths[plan.name] = str(folder / f"{plan.name}.json")
        plan.save(paths[plan.name])
    return paths


def engine(model_dir, prefix_caching=False, **kw) -> LLM:
    return LLM(EngineConfig(model=str(model_dir), dtype="float32",
                            cache=CacheConfig(num_blocks=128, enable_prefix_caching=prefix_caching),
                            scheduler=SchedulerConfig(max_model_len=96, max_num_batched_tokens=64), **kw))


def greedy(profile: str | None = None, **pruning) -> SamplingParams:
    req = RequestPruning(profile=profile, **pruning) if profile or pruning else None
    return SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, pruning=req)


PROMPTS = [list(range(3, 40)), list(range(50, 70)), list(range(100, 141)), list(range(7, 30))]


def test_requests_of_different_plans_share_steps_and_match_each_plan_served_alone(tiny_model_dir, plan_files):
    served = engine(tiny_model_dir, plans=("dense", plan_files["narrow"], plan_files["shallow"],
                                           plan_files["budget"]))
    assert [v.name for v in served.engine.variants] == ["dense", "narrow", "shallow", "budget"]
    profiles = [None, "narrow", "shallow", "budget"]
    groups: list[list[str]] = []                  # per step, the plans whose group ran
    real_execute = served.engine.runner.execute

    def execute(sched):
        groups.append([])
        return real_execute(sched)
    served.engine.runner.execute = execute
    for v in served.engine.variants:
        def run(sched, real=v.runner.execute, name=v.name):
            groups[-1].append(name)
            return real(sched)
        v.runner.execute = run
    # All four in one batch: every step runs one group per plan.
    mixed = served.generate(PROMPTS, [greedy(p) for p in profiles])
    assert sum(len(g) == 4 for g in groups) >= 9          # the 10 decode steps (and prefills) of all four
    assert served.engine.scheduler.num_preemptions == 0
    for prompt, profile, out in zip(PROMPTS, profiles, mixed):
        alone = engine(tiny_model_dir, plan=plan_files[profile] if profile else None)
        want = alone.generate([prompt], greedy())[0].outputs[0].token_ids
        assert out.outputs[0].token_ids == want, profile
    # A request may still change the dynamic axes of its plan: a KV budget on the narrow plan.
    alone = engine(tiny_model_dir, plan=plan_files["narrow"])
    want = alone.generate([PROMPTS[2]], greedy(kv_budget=16))[0].outputs[0].token_ids
    got = served.generate([PROMPTS[2], PROMPTS[0]], [greedy("narrow", kv_budget=16), greedy("shallow")])
    assert got[0].outputs[0].token_ids == want


def test_one_kv_cache_holds_the_widest_plan_and_each_plan_reports_its_own_weights(tiny_model_dir, plan_files):
    served = engine(tiny_model_dir, plans=(plan_files["narrow"], "dense"))
    k0, _ = served.engine.variants[1].runner.kv_caches[0]
    narrow_k0, _ = served.engine.variants[0].runner.kv_caches[0]
    assert k0.shape[1] == 2 and narrow_k0.shape[1] == 1
    assert narrow_k0.untyped_storage().data_ptr() == k0.untyped_storage().data_ptr()    # a view, not a copy
    first, second = served.engine.variants
    assert first.model.embed_tokens.weight is second.model.embed_tokens.weight
    assert 0 < second.weight_bytes < first.weight_bytes      # the second holds only its layers
    # The narrow plan is the default: a request without a profile runs it.
    alone = engine(tiny_model_dir, plan=plan_files["narrow"])
    assert served.generate([PROMPTS[1]], greedy())[0].outputs[0].token_ids == \
        alone.generate([PROMPTS[1]], greedy())[0].outputs[0].token_ids


def test_prefix_caching_never_shares_blocks_between_plans(tiny_model_dir, plan_files):
    served = engine(tiny_model_dir, prefix_caching=True, plans=("dense", plan_files["shallow"]))
    prompt = list(range(3, 60))
    served.generate([prompt], greedy())
    bm = served.engine.block_manager
    salts = {v.name: v.cache_salt for v in served.engine.variants}
    assert salts["dense"] != salts["shallow"]

    def matched(salt: int) -> int:
        seq = Sequence(999, "probe", 0, prompt, greedy(), 4, cache_salt=salt)
        n = bm.match_prefix(seq)
        bm.free_sequence(seq)
        return n

    assert matched(salts["dense"]) > 0 and matched(salts["shallow"]) == 0
    alone = engine(tiny_model_dir, plan=plan_files["shallow"])
    assert served.generate([prompt], greedy("shallow"))[0].outputs[0].token_ids == \
        alone.generate([prompt], greedy())[0].outputs[0].token_ids


def test_bad_plan_lists_and_unknown_profiles_are_refused(tiny_model_dir, plan_files):
    served = engine(tiny_model_dir, plans=("dense", plan_files["narrow"]))
    with pytest.raises(ValueError, match=r"'wide' is not served here; served plans: \['dense', 'narrow'\]"):
        served.generate([PROMPTS[0]], greedy("wide"))
    with pytest.raises(ValueError, match="both named 'narrow'"):
        engine(tiny_model_dir, plans=(plan_files["narrow"], plan_files["narrow"]))
    with pytest.raises(ValueError, match="not both"):
        engine(tiny_model_dir, plan=plan_files["narrow"], plans=("dense",))


def test_serve_flags_take_a_plan_list(tiny_model_dir, plan_files):
    from trident.server.cli import build_parser, engine_config_from_args

    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--plans",
                                      f"dense, {plan_files['narrow']}"])
    assert engine_config_from_args(args).plans == ("dense", plan_files["narrow"])
    args = build_parser().parse_args(["serve", "--model", str(tiny_model_dir), "--plans", "dense",
                                      "--plan", "dense"])
    with pytest.raises(ValueError, match="--plan or --plans"):
        engine_config_from_args(args)


def test_a_served_plan_named_like_a_dynamic_profile_is_that_plan(tiny_model_dir, plan_files):
    served = engine(tiny_model_dir, plans=(plan_files["shallow"], plan_files["lossless"]))
    alone = engine(tiny_model_dir, plan=plan_files["lossless"])
    want = alone.generate([PROMPTS[0]], greedy())[0].outputs[0].token_ids
    # No speculative decoding is served: "lossless" here is the loaded plan, not speculation.
    assert served.generate([PROMPTS[0]], greedy("lossless"))[0].outputs[0].token_ids == want
    with pytest.raises(ValueError, match="speculative decoding is not served"):
        served.generate([PROMPTS[0]], greedy("lossless", speculative=True))
