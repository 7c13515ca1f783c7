"""Decoding methods by name: which model verifies, which proposes, and the acceptance rule.

Every method of cospec's own runs through the one loop in ``cospec.decoding``:
target/draft/SPD/CoSpec and the heuristics by ``decoding.generate``, prompt lookup
(``lookup``, ``spd-lookup``, ``spd-staged``) by ``lookup.lookup_generate``, the CoS
combination methods by ``cos.cos_generate``. ``hf-assisted`` (the peer, transformers'
assisted generation) lives beside them for benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cospec import fast, fast_block
from cospec.acceptance import AcceptanceRule, ExactRule
from cospec.arbiter import ArbiterRule, ConfidencePolicy, EntropyPolicy, load_arbiter
from cospec.block_choice import Choice, arbiter_choice, combination_choice, expresses
from cospec.cos import COS_METHODS, Combination, cos_generate
from cospec.decoding import Token, generate
from cospec.errors import CospecError
from cospec.lookup import LOOKUP_METHODS, lookup_generate
from cospec.models import Pair
from cospec.sampling import GREEDY, SamplingConfig
from cospec.stats import DecodeStats

METHODS = ("target", "draft", "spd", "cospec", "confidence", "entropy", "hf-assisted",
           *LOOKUP_METHODS, *COS_METHODS)
OWN_METHODS = tuple(m for m in METHODS if m != "hf-assisted")  # decoded by cospec's own loops
# what one prompt decodes with unless told (``cospec generate``, the Python API): spd with
# the draft checking prompt-lookup guesses, the target's output (greedy: its tokens) and
# faster than spd in total in every run that timed both (H100: 7-35 %; a 2-core Xeon: 3-12 %;
# GSM8K and HumanEval, the draft's own weights and its int8 copies; docs/methods.md)
DEFAULT_METHOD = "spd-staged"
# greedy methods whose tokens equal another method's by construction (exact speculation)
SAME_AS_GREEDY = {"spd": "target", "lookup": "target", "spd-lookup": "target",
                  "spd-staged": "target", "we-sd": "we",
                  "cos-we": "we", "cd-sd": "cd", "cos-cd": "cd"}
# methods whose output is the target's, whatever the draft proposes (greedy: its tokens;
# sampled: its distribution)
TARGET_OUTPUT = ("target", *(m for m, same in SAME_AS_GREEDY.items() if same == "target"))
LOSSY = ("cospec", "confidence", "entropy")
NO_DRAFT = ("target", "lookup")  # methods that run without a draft model
GREEDY_ONLY = LOSSY
SHIPPED_ARBITER = Path(__file__).parent / "data" / "arbiter-qwen2.5-coder-1.5b-0.5b.safetensors"


@dataclass
class MethodOptions:
    arbiter: str | None = None        # path of a trained arbiter (cospec)
    threshold: float | None = None    # P(DRAFT) to keep the draft token (default: arbiter's)
    every_mismatch: bool = True       # arbitrate every mismatch of a block, or the first only
    max_overrides: int | None = None  # draft tokens an arbiter may keep per generation
    delta: float = 0.1                # confidence heuristic
    entropy: float = 1.0              # entropy-gated deferral (nats)
    lam: float = 0.5                  # CoS weighted ensemble: r = lam q_draft + (1-lam) p
    mu: float = 0.1                   # CoS contrastive decoding: r ~ l_target - mu l_draft
    extra_models: tuple = ()          # CoS with n > 2 models: more models after the draft
    weights: tuple[float, ...] = ()   # CoS ensemble weights for n > 2 models

@dataclass
class Method:
    name: str
    verifier: torch.nn.Module
    proposer: torch.nn.Module | None
    rule: AcceptanceRule | None
    combo: Combination | None = None
    models: tuple = ()  # CoS: every model, proposer first

    def stream(self, prompt_ids: list[int], *, k: int, max_new_tokens: int,
               sampling: SamplingConfig, eos_ids, seed: int | None = None,
               stats: DecodeStats | None = None) -> Iterator[Token]:
        """Tokens as they are committed (the loop for this method; greedy spd, spd-staged,
        cospec and the heuristics, and sampled spd, spd-staged, cos-we and cos-cd on a GPU:
        each block on the device, ``cospec.fast_block``, unless COSPEC_SPD_BLOCK=0)."""
        if self.device_block(prompt_ids, sampling):
            # a block drafts k tokens: at most the new tokens less the verify's own (the
            # host loops cap each block so; the device's caches are sized by k)
            k = max(1, min(k, max_new_tokens - 1))
            # spd-staged: fast_block.GUESSES, within the fast path's MAX_GRAPH rows a verify
            guesses = (max(0, min(fast_block.GUESSES, fast.MAX_GRAPH - 1 - k))
                       if self.name == "spd-staged" else 0)
            return fast_block.stream(self.verifier, self.proposer, prompt_ids, k=k,
                                     max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                                     stats=stats, guesses=guesses, choice=self.block_choice(),
                                     sampling=sampling, seed=seed)
        if self.name in LOOKUP_METHODS:
            return lookup_generate(self.verifier, self.proposer, prompt_ids, self.rule, k=k,
                                   max_new_tokens=max_new_tokens, sampling=sampling,
                                   eos_ids=eos_ids, seed=seed, stats=stats,
                                   staged=self.name == "spd-staged")
        if self.combo is not None:
            return cos_generate(list(self.models), prompt_ids, self.combo, self.name, gamma=k,
                                max_new_tokens=max_new_tokens, sampling=sampling,
                                eos_ids=eos_ids, seed=seed, stats=stats)
        return generate(self.verifier, self.proposer, prompt_ids, self.rule, k=k,
                        max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=eos_ids,
                        seed=seed, stats=stats)

    def device_block(self, prompt_ids: list[int], sampling: SamplingConfig) -> bool:
        """Does ``stream`` run each block on the device (``cospec.fast_block``)? For greedy
        spd, spd-staged and the methods with a block choice (``has_choice``), and for sampled
        spd, spd-staged, cos-we and cos-cd, both models on the fast path's engines
        (``fast_block.serves``). Touches no device (the server asks on its event loop)."""
        if self.proposer is None:
            return False
        # an arbiter's choice is greedy only; a combination's block samples too
        takes = self.name in ("spd", "spd-staged") or (
            self.has_choice() and (sampling.greedy or self.combo is not None))
        return takes and fast_block.serves(self.verifier, self.proposer, prompt_ids)

    def has_choice(self) -> bool:
        """Does a device-side block express this greedy method by a choice at each position
        (``cospec.block_choice``)? An arbiter rule it expresses, or the alternate-proposal
        CoS of two models."""
        if isinstance(self.rule, ArbiterRule):
            return expresses(self.rule)
        return self.combo is not None and self.name.startswith("cos-") and len(self.models) == 2

    def block_choice(self) -> Choice | None:
        """The choice of ``has_choice`` on the verifier's device (made once for the policy
        or combination), or None."""
        if not self.has_choice():
            return None
        device = next(self.verifier.parameters()).device
        if isinstance(self.rule, ArbiterRule):
            return arbiter_choice(self.rule, device)
        return combination_choice(self.combo, device)

    def run(self, prompt_ids: list[int], *, k: int, max_new_tokens: int,
            sampling: SamplingConfig, eos_ids, seed: int | None = None
            ) -> tuple[list[int], list[bool], DecodeStats]:
        """Generate to completion: (token ids, from_draft flags, stats)."""
        stats = DecodeStats()
        if self.name == "hf-assisted":
            ids = hf_assisted(self.verifier, self.proposer, prompt_ids, k, max_new_tokens,
                              sampling, eos_ids, seed, stats)
            return ids, [False] * len(ids), stats
        toks = list(self.stream(prompt_ids, k=k, max_new_tokens=max_new_tokens,
                                sampling=sampling, eos_ids=eos_ids, seed=seed, stats=stats))
        return [t.id for t in toks], [t.from_draft for t in toks], stats


def needs_draft(names: list[str] | None) -> bool:
    """Some of ``names`` (None: the defaults, which include spd) runs with a draft model."""
    return names is None or any(n not in NO_DRAFT for n in names)


def policy_for(name: str, pair: Pair, opts: MethodOptions):
    """The mismatch policy of a lossy method."""
    if name == "confidence":
        return ConfidencePolicy(opts.delta)
    if name == "entropy":
        return EntropyPolicy(opts.entropy)
    path = opts.arbiter
    if path is None:
        if not SHIPPED_ARBITER.exists():
            raise CospecError("cospec needs --arbiter PATH (no shipped arbiter in this build)")
        path = str(SHIPPED_ARBITER)
    return load_arbiter(path, (pair.target_name, pair.draft_name))


def _kind(kind: str) -> tuple[str, ...]:
    return tuple(m for m in COS_METHODS if kind in m.split("-"))


# the options only some methods read: field of MethodOptions -> (its flag, those methods)
READ_BY = {"arbiter": ("--arbiter", ("cospec",)), "threshold": ("--threshold", LOSSY),
           "every_mismatch": ("--first-mismatch-only", LOSSY),
           "max_overrides": ("--max-overrides", LOSSY), "delta": ("--delta", ("confidence",)),
           "entropy": ("--entropy", ("entropy",)), "lam": ("--lambda", _kind("we")),
           "weights": ("--weights", _kind("we")), "mu": ("--mu", _kind("cd"))}


def unread_options(opts: MethodOptions, methods: list[str]) -> list[tuple[str, str, tuple]]:
    """The options ``opts`` sets away from their defaults that none of ``methods`` reads
    (``--arbiter`` with ``--method spd`` decodes spd, not cospec): (field, flag, the methods
    that read it) each."""
    base = MethodOptions()
    return [(field, flag, readers) for field, (flag, readers) in READ_BY.items()
            if getattr(opts, field) != getattr(base, field) and not set(readers) & set(methods)]


def check_sampling(name: str, sampling: SamplingConfig) -> None:
    """Refuses a sampled config for a greedy-only method (the lossy rules decide greedy
    mismatches): callers check before loading models, ``build_method`` again."""
    if name in GREEDY_ONLY and not sampling.greedy:
        raise CospecError(f"method {name} is greedy-only: use --temperature 0")


def build_method(name: str, pair: Pair, opts: MethodOptions | None = None,
                 sampling: SamplingConfig = GREEDY) -> Method:
    opts = opts or MethodOptions()
    if name not in METHODS:
        raise CospecError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name not in NO_DRAFT and pair.draft is None:
        raise CospecError(f"method {name} needs a draft model (--draft)")
    if pair.extra and name not in (*COS_METHODS, "target", "draft"):
        raise CospecError(f"{len(pair.extra) + 2} models given but {name} uses two: more "
                          f"than two models are for the CoS methods ({', '.join(COS_METHODS)})")
    check_sampling(name, sampling)
    if name in ("target", "lookup"):
        return Method(name, pair.target, None, ExactRule())
    if name == "draft":
        return Method(name, pair.draft, None, ExactRule())
    if name in ("spd", "spd-lookup", "spd-staged", "hf-assisted"):
        return Method(name, pair.target, pair.draft, ExactRule())
    if name in COS_METHODS:
        models = (pair.draft, *pair.extra, *opts.extra_models, pair.target)
        kind = "we" if "we" in name.split("-") else "cd"
        if kind == "we":
            if opts.weights and opts.lam != MethodOptions().lam:
                raise CospecError("give the ensemble's weights (--weights) or lambda "
                                  "(--lambda), not both")
            weights = opts.weights or ((opts.lam, 1 - opts.lam) if len(models) == 2 else
                                       tuple([1 / len(models)] * len(models)))
            if len(weights) != len(models):
                raise CospecError(f"{len(models)} models but {len(weights)} weights")
            combo = Combination("we", tuple(weights))
        else:
            combo = Combination("cd", mu=opts.mu)
        return Method(name, pair.target, pair.draft, None, combo, models)
    policy = policy_for(name, pair, opts)
    threshold = opts.threshold if opts.threshold is not None else getattr(policy, "threshold", 0.5)
    budget = (opts.max_overrides if opts.max_overrides is not None
              else getattr(policy, "max_overrides", None))
    rule = ArbiterRule(policy, threshold=threshold, every_mismatch=opts.every_mismatch,
                       max_overrides=budget)
    return Method(name, pair.target, pair.draft, rule)


def hf_assisted(target, draft, prompt_ids, k, max_new_tokens, sampling, eos_ids, seed,
                stats: DecodeStats) -> list[int]:
    """The peer: ``transformers`` assisted generation with a constant k (prefill excluded
    from its timing is not possible: its whole call is counted as decode time)."""
    import time

    device = next(target.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    x = torch.tensor([prompt_ids], device=device)
    kwargs = dict(do_sample=not sampling.greedy, max_new_tokens=max_new_tokens,
                  assistant_model=draft, num_assistant_tokens=k,
                  num_assistant_tokens_schedule="constant", assistant_confidence_threshold=0.0,
                  eos_token_id=list(eos_ids) or None, pad_token_id=(list(eos_ids) or [0])[0],
                  attention_mask=torch.ones_like(x))
    if not sampling.greedy:
        kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                      top_k=sampling.top_k or None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(x, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    stats.decode_s += time.perf_counter() - t0
    ids = out[0, len(prompt_ids):].tolist()
    stats.generated += len(ids)
    return ids


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation through the tokenizer's chat template (generation prompt
    added). Without a template the contents are joined by blank lines and sent as raw text.
    A template that refuses the messages (roles it does not know, turns that do not
    alternate) is a CospecError quoting it."""
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError

        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                tokenize=True)
        except TemplateError as err:
            raise CospecError(f"the tokenizer's chat template refuses these messages: {err}"
                              ) from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return text_ids(tokenizer, "\n\n".join(m["content"] for m in messages))


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a raw prompt (special tokens added as the tokenizer does)."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_prompt(tokenizer, text: str, chat: bool = True) -> list[int]:
    """Token ids of a user prompt, through the chat template unless ``chat`` is False."""
    if not text.strip():
        raise CospecError("empty prompt")
    if chat:
        return chat_ids(tokenizer, [{"role": "user", "content": text}])
    return text_ids(tokenizer, text)


def eos_ids(tokenizer, model) -> list[int]:
    """Every id that ends a generation: the tokenizer's EOS and the model's configured ones."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = getattr(model, "generation_config", None)
    found = getattr(cfg, "eos_token_id", None)
    if found is not None:
        ids.update([found] if isinstance(found, int) else found)
    return sorted(ids)
