"""The synchronous engine: requests in, one scheduled step at a time (schedule, run, update), and
RequestOutputs out through output_processor.py (stops, detokenizing, cumulative outputs)."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import replace

import torch

from trident.engine.block_manager import BlockManager
from trident.engine.config import AUTO_KV_MEMORY, AUTO_KV_SEQUENCES, MAX_DRAFT_TOKENS, EngineConfig
from trident.engine.loader import cache_root, load_checkpoint
from trident.engine.model import LlamaModel
from trident.engine.model_runner import ModelRunner, RunnerOutput
from trident.engine.output_processor import OutputProcessor, Request
from trident.engine.outputs import RequestOutput
from trident.engine.pruning.accounting import AXES, FlopCount, FlopCounter, LayerShape
from trident.engine.pruning.apply import apply_plan
from trident.engine.pruning.length import DENSE_PROFILE, LOSSLESS_PROFILE, RequestPruning, resolve_request
from trident.engine.pruning.plan import LengthPolicy
from trident.engine.pruning.profiles import PROFILES, resolve_plan
from trident.engine.sampling_params import SamplingParams
from trident.engine.scheduler import Scheduler
from trident.engine.sequence import Sequence
from trident.engine.speculative import draft_skip_layers, speculation_blocker
from trident.engine.step_pruning import ExitProbe
from trident.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from trident.engine.variants import GroupedRunner, Variant, caches_for, kv_heads_per_layer, share_unsliced, unshared_bytes
from trident.kernels import cpu_gemm
from trident.kernels.attention import decode_computes_all_heads
from trident.kernels.linear import Linear

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        started = time.perf_counter()
        torch.manual_seed(config.seed)
        ckpt = load_checkpoint(config.model)
        self.model_config = ckpt.config
        self.model_name = ckpt.name
        self.tokenizer = Tokenizer(ckpt.tokenizer_dir, ckpt.config.eos_token_ids)
        self.device = torch.device(config.device)
        self.dtype = config.resolved_dtype
        dtype = DTYPES[self.dtype]
        context = ckpt.config.max_position_embeddings
        self.max_model_len = min(config.scheduler.max_model_len or context, context)
        self.variants = self._load_variants(ckpt, dtype)
        default = self.variants[0]
        self.plan, self.model, self.exits = default.plan, default.model, default.exits
        self._configure_cpu_gemm()
        kv_caches, num_blocks = self._allocate_kv_cache(dtype)
        self.block_manager = BlockManager(num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.block_manager)
        self.output = OutputProcessor(self.scheduler, self.tokenizer, self.max_model_len,
                                      any(v.plan is not None for v in self.variants))
        all_heads = decode_computes_all_heads(self.device)   # the CPU decode path, which also pads keys
        for v in self.variants:
            shapes: list[LayerShape | None] = [None] * ckpt.config.num_layers
            for layer in v.model.layers:
                spec = layer.spec
                # Ragged layers on CPU decode with every slot of their virtual head layout.
                decode_heads = spec.num_kv_heads * layer.self_attn.group if spec.ragged_groups and all_heads else None
                shapes[spec.index] = LayerShape(spec.num_heads, spec.num_kv_heads, spec.intermediate_size, decode_heads)
            v.runner = ModelRunner(v.model, caches_for(v.model, kv_caches), config.cache.block_size, self.device,
                                   FlopCounter(ckpt.config, shapes, decode_pads=all_heads))
            # Early exit: the plan's exit points, each a probe on the final-normed state.
            if v.exits and (v.plan.length.is_active or (config.speculative is not None and v is default)):
                raise ValueError("a plan with early exits does not combine with length pruning or speculative "
                                 "decoding yet")
            v.runner.exit_probes = {i: ExitProbe(torch.tensor(e.probe_weight, dtype=torch.float32, device=self.device),
                                                 float(e.probe_bias), float(e.temperature)) for i, e in v.exits.items()}
        self.runner = default.runner if len(self.variants) == 1 else \
            GroupedRunner(self.variants, [c for c in kv_caches if c is not None], self.device)
        self.draft_skip: list[int] = []                         # layers a speculative draft skips
        if config.speculative is not None:
            if self.plan is not None and self.plan.length.is_active:
                raise ValueError("speculative decoding does not combine with a plan that prunes length")
            self.set_draft(draft_skip_layers(config.speculative.draft, ckpt.config, self.model_name))     # first plan
            log.info("speculative decoding: the draft skips layers %s, %d tokens per step", self.draft_skip,
                     config.speculative.num_draft_tokens)
        self.total_flops = FlopCount()                          # since start, all requests
        self.saved_seconds = dict.fromkeys(AXES, 0.0)           # step time attributed by FLOP share
        self.busy_seconds = 0.0
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self.load_time = time.perf_counter() - started
        log.info("loaded %s (%s, %d layers) in %.2fs; KV cache %d blocks x %d tokens",
                 self.model_name, self.dtype, ckpt.config.num_layers, self.load_time, num_blocks,
                 config.cache.block_size)

    # ------------------------------------------------------------------ setup

    def _configure_cpu_gemm(self) -> None:
        """Decode-sized float32 CPU products take the GEMM provider measured fastest for their row
        count on this machine (or the pinned one): kernels/cpu_gemm.py."""
        if self.device.type != "cpu" or self.dtype != "float32":
            return
        weights = [m.weight for m in self.model.modules() if isinstance(m, Linear)]    # in forward order
        speculative = self.config.speculative
        rows = self.config.scheduler.max_num_seqs * (1 + (speculative.num_draft_tokens if speculative else 0))
        cpu_gemm.configure(self.config.cpu_gemm, weights, rows, cache_root())

    def _load_variants(self, ckpt, dtype) -> list[Variant]:
        """The served plans (`plans`, else `plan`, else the unpruned model), each sliced from the
        checkpoint; the embedding, final norm and LM head are the first one's tensors."""
        config = self.config
        names = list(config.plans) or ([config.plan] if config.plan else [None])
        if config.plan and config.plans:
            raise ValueError("give one plan (plan) or several (plans), not both")
        variants, seen = [], set()
        for name in names:
            plan = resolve_plan(name, ckpt.config, self.model_name) if name else None
            state = apply_plan(ckpt.state_dict, ckpt.config, plan) if plan is not None else ckpt.state_dict
            model = LlamaModel.from_hf_state_dict(ckpt.config, state, self.max_model_len, dtype, self.device)
            label = "dense" if plan is None else (name if name in PROFILES else plan.name)
            if any(v.name == label for v in variants):
                raise ValueError(f"two served plans are both named {label!r}: give each plan a distinct name")
            if variants:
                share_unsliced(variants[0].model, model)
            exits = {i: layer.exit for i, layer in enumerate(plan.layers) if layer.exit is not None} if plan else {}
            variant = Variant(label, plan, model, exits=exits, cache_salt=hash(("variant", label)) if variants else 0)
            variant.weight_bytes = unshared_bytes(model, seen)
            variants.append(variant)
        if len(variants) > 1:
            log.info("serving %d plans: %s", len(variants),
                     ", ".join(f"{v.name} ({v.weight_bytes / 2**20:.0f} MiB)" for v in variants))
        return variants

    def _allocate_kv_cache(self, dtype):
        """One cache slot space for every served variant: per layer, as many KV heads as the
        widest variant keeps there (None where none keeps the layer)."""
        cfg, cache = self.model_config, self.config.cache
        heads = kv_heads_per_layer(self.variants, cfg.num_layers)
        bytes_per_slot = 2 * sum(heads) * cfg.head_dim * torch.finfo(dtype).bits // 8
        memory = cache.kv_cache_memory or max(AUTO_KV_MEMORY, AUTO_KV_SEQUENCES * self.max_model_len * bytes_per_slot)
        num_blocks = cache.num_blocks or memory // (bytes_per_slot * cache.block_size)
        if num_blocks * cache.block_size < self.max_model_len:
            raise ValueError(f"KV cache of {num_blocks} blocks x {cache.block_size} tokens cannot hold one "
                             f"sequence of max_model_len={self.max_model_len}: raise the KV cache memory or "
                             f"lower max_model_len")
        slots = num_blocks * cache.block_size
        kv_caches = [(torch.zeros(slots, h, cfg.head_dim, dtype=dtype, device=self.device),
                      torch.zeros(slots, h, cfg.head_dim, dtype=dtype, device=self.device)) if h else None
                     for h in heads]
        return kv_caches, num_blocks

    def set_draft(self, skip: list[int]) -> None:
        """The layers (original indices) the speculative draft skips; benchmarks compare drafts on
        one loaded model by calling this between runs."""
        present = [i for i, layer in enumerate(self.model.layers) if layer.spec.index not in skip]
        if len(present) == len(self.model.layers):
            raise ValueError(f"the speculative draft skips layers {sorted(skip)}, which the plan already drops")
        if not present:
            raise ValueError("the speculative draft skips every layer")
        self.draft_skip = sorted(skip)
        self.variants[0].runner.draft_layers = present

    # ------------------------------------------------------------------ requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model's limits; returns its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {vocab}), got {params.stop_token_ids}")
        banned = {*params.stop_token_ids, *(() if params.ignore_eos else self.tokenizer.eos_token_ids)}
        if params.min_tokens and len(banned) >= vocab:
            raise ValueError("min_tokens with stop_token_ids covering the whole vocabulary leaves nothing to sample")
        if n >= self.max_model_len and not (n == self.max_model_len and params.max_tokens == 0):
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the prompt "
                             f"has {n} tokens, leaving no room for output")
        policy = self.length_policy(params)
        if policy.prefill_keep and params.prompt_logprobs is not None:
            raise ValueError("prompt logprobs (echo with logprobs) need every prompt token's logits, and "
                             "prefill pruning drops rows before the last layer: turn one of them off")
        self.draft_tokens(params, policy)
        self.exit_thresholds(params, policy)
        max_tokens = self.max_model_len - n if params.max_tokens is None else params.max_tokens
        if n + max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"has {n} prompt tokens and asks for {max_tokens} output tokens "
                             f"({n + max_tokens} in total)")
        return max_tokens

    def variant_for(self, params: SamplingParams) -> Variant:
        """The served plan a request runs: the one its `pruning.profile` names, else the first.
        ValueError for a profile that is neither a served plan nor a dynamic profile."""
        profile = params.pruning.profile if params.pruning is not None else None
        for v in self.variants:
            if v.name == profile:
                return v
        if profile is not None and profile not in (DENSE_PROFILE, LOSSLESS_PROFILE) and len(self.variants) > 1:
            raise ValueError(f"pruning.profile {profile!r} is not served here; served plans: "
                             f"{[v.name for v in self.variants]}, or {DENSE_PROFILE!r} / {LOSSLESS_PROFILE!r} "
                             f"(no dynamic pruning / speculative decoding on {self.variants[0].name!r})")
        return self.variants[0]

    def _dynamic(self, params: SamplingParams) -> RequestPruning | None:
        """A request's `pruning` object as the dynamic settings see it: a profile that named a served
        plan has done its work by choosing it (so a plan served as `lossless` is that plan, not
        speculative decoding); `dense` keeps its meaning, no dynamic pruning."""
        request = params.pruning
        if request is None or request.profile in (None, DENSE_PROFILE) or len(self.variants) == 1 \
                or request.profile not in {v.name for v in self.variants}:
            return request
        return replace(request, profile=None)

    def length_policy(self, params: SamplingParams) -> LengthPolicy:
        """The length-axis policy a request runs: its plan's, changed by its `pruning` object."""
        v = self.variant_for(params)
        served = v.plan.length if v.plan is not None else LengthPolicy()
        return resolve_request(self._dynamic(params), served,
                               v.name if v.plan is not None or len(self.variants) > 1 else None,
                               self.model_config.num_layers, v.kept_layers)

    def draft_tokens(self, params: SamplingParams, policy: LengthPolicy) -> int:
        """Tokens a request drafts per step (0: no speculation): the server's default, changed by
        its `pruning` object; `policy` is its length policy. ValueError for speculation asked for
        where it cannot run."""
        request, served = self._dynamic(params), self.config.speculative
        asked = request is not None and (request.speculative or request.num_draft_tokens is not None
                                         or request.profile == LOSSLESS_PROFILE)
        if request is not None and request.speculative is False:
            if request.profile == LOSSLESS_PROFILE:
                raise ValueError("pruning.profile 'lossless' is speculative decoding: it cannot turn speculative off")
            if request.num_draft_tokens is not None:
                raise ValueError("pruning.num_draft_tokens needs speculative decoding, which pruning.speculative turns off")
            return 0
        if not asked and (served is None or (request is not None and request.profile == DENSE_PROFILE)):
            return 0
        if served is None:
            raise ValueError("speculative decoding is not served here: start the server with --speculative-draft "
                             "(a depth plan such as depth-4, or layers to skip)")
        if self.variant_for(params) is not self.variants[0]:
            if asked:
                raise ValueError(f"speculative decoding runs on the first served plan ({self.variants[0].name!r}) "
                                 f"only")
            return 0
        k = request.num_draft_tokens if request is not None and request.num_draft_tokens is not None \
            else served.num_draft_tokens
        if not 1 <= k <= MAX_DRAFT_TOKENS:
            raise ValueError(f"pruning.num_draft_tokens must be in [1, {MAX_DRAFT_TOKENS}], got {k}")
        blocker = speculation_blocker(params)
        if blocker is None and policy.is_active:
            blocker = "length pruning (kv_budget, prefill_keep)"
        if blocker is not None:
            if asked:
                raise ValueError(f"speculative decoding does not run with {blocker}: turn one of them off")
            return 0        # the server's default speculation steps aside for what it cannot verify
        return k

    def exit_thresholds(self, params: SamplingParams, policy: LengthPolicy) -> dict[int, float] | None:
        """A request's early exits (exit layer -> probe threshold), or None: the plan's, changed by
        its `pruning` object; `policy` is its length policy. ValueError for exits asked for where
        they cannot run."""
        request = self._dynamic(params)
        asked = request is not None and (request.early_exit or request.exit_threshold is not None)
        if request is not None and request.early_exit is False:
            if request.exit_threshold is not None:
                raise ValueError("pruning.exit_threshold needs early exit, which pruning.early_exit turns off")
            return None
        if request is not None and request.profile == LOSSLESS_PROFILE:
            if asked:
                raise ValueError("pruning.profile 'lossless' runs no early exit (exits change the output): "
                                 "drop early_exit and exit_threshold")
            return None
        if request is not None and request.profile == DENSE_PROFILE:
            if asked:
                raise ValueError("pruning.profile 'dense' runs no dynamic pruning: drop early_exit and exit_threshold")
            return None
        exits = self.variant_for(params).exits
        if not asked and not exits:
            return None
        if not exits:
            raise ValueError("the served plan has no exit points: serve a plan with exits (`trident calibrate "
                             "--exit-layers ...` writes exit.json) to use pruning.early_exit or exit_threshold")
        threshold = request.exit_threshold if request is not None else None
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"pruning.exit_threshold must be in [0, 1], got {threshold}")
        conflict = None
        if request is not None and (request.speculative or request.num_draft_tokens is not None):
            conflict = "speculative decoding"
        elif policy.is_active:
            conflict = "length pruning (kv_budget, prefill_keep)"
        if conflict is not None:
            if asked:
                raise ValueError(f"early exit does not combine with {conflict} yet: turn one of them off")
            return None     # the plan's default exits step aside for what the request asked instead
        return {i: e.threshold if threshold is None else float(threshold) for i, e in exits.items()}

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        max_tokens = self.validate(prompt_token_ids, params)
        seqs, detoks = [], []
        for i in range(params.n):
            child = params.for_child(i) if params.n > 1 else params
            policy = self.length_policy(child)
            variant = self.variant_for(child)
            seq = Sequence(next(self._seq_ids), request_id, i, list(prompt_token_ids), child, max_tokens,
                           length=policy, num_draft_tokens=self.draft_tokens(child, policy),
                           exit_thresholds=self.exit_thresholds(child, policy),
                           variant=variant.name if len(self.variants) > 1 else None, cache_salt=variant.cache_salt)
            if child.min_tokens:
                eos = () if child.ignore_eos else self.tokenizer.eos_token_ids
                seq.min_tokens_banned = sorted({*child.stop_token_ids, *eos})
            if seq.wants_prompt_logprobs:
                seq.prompt_logprobs.append(None)           # the first token has no context
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens))
            self.scheduler.add(seq)
        self.requests[request_id] = Request(request_id, list(prompt_token_ids), seqs, detoks, FlopCount())

    def abort_request(self, request_id: str) -> None:
        req = self.requests.pop(request_id, None)
        for seq in req.seqs if req else []:
            self.scheduler.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        """Requests with a sequence in the waiting queue (the unit of `max_waiting`)."""
        # tuple() copies the deque in one C call, so the step loop's thread cannot change it midway.
        return len({seq.request_id for seq in tuple(self.scheduler.waiting)})

    # ------------------------------------------------------------------ stepping

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            if self.requests:   # cannot happen while a lone max_model_len sequence fits the cache
                raise RuntimeError("the scheduler made no progress with requests pending")
            return []
        result = self.runner.execute(sched)
        self._account(result)
        self.scheduler.update_after_step(sched, result)
        outputs = []
        for req in self.output.process(sched, result, self.requests):
            outputs.append(self.output.make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _account(self, result: RunnerOutput) -> None:
        step = result.step_flops
        self.total_flops.add(step)
        self.busy_seconds += result.step_time
        for axis in AXES:
            # Seconds this axis saved: the measured step time scaled by its FLOP share.
            self.saved_seconds[axis] += result.step_time * step.saved[axis] / max(step.executed, 1.0)
