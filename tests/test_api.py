"""The Python API (cospec.load_pair, Pair.generate / stream) on tiny saved models: exactness
through the API, options reaching the methods, streamed text, clear errors, the documented
snippet, and a core install without the optional extras."""

import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import cospec
from cospec import api, models
from cospec.decoding import Token as Committed

DOC = Path(__file__).parents[1] / "docs" / "api.md"
README = Path(__file__).parents[1] / "README.md"
PROMPTS = ["the answer is", [{"role": "user", "content": "hello world"}], [5, 9, 12, 40]]


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    return cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu")


@pytest.fixture(scope="module")
def self_pair(tiny_dirs):
    """The target as its own draft: every draft token is accepted."""
    return cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[0]), "cpu", "float32")


@pytest.mark.parametrize("prompt", PROMPTS, ids=["text", "chat", "ids"])
def test_greedy_spd_equals_target(pair, self_pair, prompt):
    """A random draft (almost nothing accepted) and the target itself (everything accepted)
    both give the target's greedy tokens; the stats say how much the draft wrote."""
    alone = pair.generate(prompt, method="target", max_new_tokens=24)
    spd = pair.generate(prompt, method="spd", k=3, max_new_tokens=24)
    same = self_pair.generate(prompt, method="spd", k=3, max_new_tokens=24)
    assert len(alone.token_ids) > 0
    assert spd.token_ids == alone.token_ids == same.token_ids
    assert spd.text == alone.text == pair.tokenizer.decode(alone.token_ids,
                                                           skip_special_tokens=True)
    s = same.stats
    assert s.tokens == len(same.token_ids) and s.drafted > 0 and s.accepted == s.drafted
    assert s.tau == pytest.approx(1 + s.accepted / s.steps) and s.tau > 2
    assert sum(same.from_draft) == s.accepted and not any(alone.from_draft)
    assert s.seconds == pytest.approx(s.prefill_s + s.decode_s) and s.tokens_per_s > 0
    assert same.finish_reason == ("stop" if same.token_ids[-1] == pair.tokenizer.eos_token_id
                                  else "length")


def test_cos_options_reach_the_combination(pair):
    """lam=1 is the draft alone, lam=0 and mu=0 the target alone; the speculative variants
    equal the plain combination at T=0 for the same options."""
    def ids(method, **kw):
        return pair.generate("the answer is", method=method, k=3, max_new_tokens=16,
                             chat=False, **kw).token_ids

    target, draft = ids("target"), ids("draft")
    assert target != draft
    assert ids("we", lam=1.0) == draft and ids("we", lam=0.0) == target
    assert ids("we", weights=(1.0, 0.0)) == draft
    assert ids("cd", mu=0.0) == target
    for kind, kw in (("we", {"lam": 0.3}), ("cd", {"mu": 0.8})):
        plain = ids(kind, **kw)
        assert ids(f"{kind}-sd", **kw) == ids(f"cos-{kind}", **kw) == plain


@pytest.mark.parametrize("method, kw", [
    ("spd", {}), ("cos-cd", {"temperature": 1.0, "seed": 3}),
    ("target", {"temperature": 0.8, "top_k": 20, "seed": 1}),
])
def test_stream_pieces_join_to_the_text(pair, method, kw):
    run = pair.stream("hello world", method=method, k=3, max_new_tokens=40, **kw)
    pieces = list(run)
    done = pair.generate("hello world", method=method, k=3, max_new_tokens=40, **kw)
    assert [t.id for t in pieces] == done.token_ids == run.token_ids
    assert "".join(t.text for t in pieces) == done.text == run.text
    assert [t.from_draft for t in pieces] == done.from_draft
    assert run.stats.tokens == len(pieces) and run.finish_reason == done.finish_reason


class SlowTokenizer:
    """The tokenizer without its fast backend: the whole-output fallback decoder."""

    def __init__(self, tok):
        self.tok = tok

    def decode(self, ids, skip_special_tokens=False):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return len(self.tok)


@pytest.mark.parametrize("fast", [True, False], ids=["DecodeStream", "whole-output"])
def test_detokenizing_holds_back_incomplete_characters(pair, fast):
    """Random ids (often cutting a UTF-8 character in two, at the end too) decode piece by
    piece to exactly the whole decode, every id yielded once, in order."""
    tok = pair.tokenizer if fast else SlowTokenizer(pair.tokenizer)
    rng = random.Random(0)
    for _ in range(60):
        ids = [rng.randrange(len(pair.tokenizer)) for _ in range(rng.randrange(1, 25))]
        flags = [rng.random() < 0.5 for _ in ids]
        out = list(api._detokenize(iter(map(Committed, ids, flags)), tok))
        assert [(t.id, t.from_draft) for t in out] == list(zip(ids, flags))
        assert "".join(t.text for t in out) == tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("kw, message", [
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": "hf-assisted"}, "unknown method"),
    ({"k": 0}, "k (draft length) must be an integer >= 1"),
    ({"k": 2.5}, "k (draft length) must be an integer >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be"),
    ({"temperature": -0.1}, "temperature must be a finite number >= 0"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"seed": 2**70}, "seed must be an integer in [-2^63, 2^63)"),
    ({"method": "cd", "mu": float("inf")}, "mu must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"lamda": 0.3}, "unknown option(s) lamda"),
    ({"method": "we", "lam": 1.5}, "lam must be in [0, 1]"),
    ({"method": "we", "weights": (0.5, 0.6)}, "sum to 1"),
    ({"method": "cd", "mu": -1}, "mu must be >= 0"),
    ({"method": "we", "weights": 0.3}, "weights must be a list of numbers"),
    ({"method": "cospec", "threshold": 1.5}, "threshold must be None or in [0, 1]"),
    ({"method": "entropy", "temperature": 0.7}, "greedy-only"),
    ({"prompt": "   "}, "empty prompt"),
    ({"prompt": []}, "non-empty string"),
    ({"prompt": [3, 10_000]}, "outside the vocabulary"),
    ({"prompt": [{"role": "user"}]}, "string 'role' and 'content'"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chat": False}, "pass chat=True"),
])
def test_bad_arguments_are_clear_errors(pair, kw, message):
    kw = {"prompt": "hello", **kw}
    for call in (pair.generate, pair.stream):  # stream refuses before it is iterated
        with pytest.raises(cospec.CospecError) as err:
            call(**kw)
        assert message in str(err.value)


def test_target_only_pair_and_bad_loads(tiny_dirs):
    alone = cospec.load_pair(str(tiny_dirs[0]), draft=False, device="cpu")
    assert alone.draft is None and alone.generate("hi", method="target", max_new_tokens=4)
    looked = alone.generate("hi", method="lookup", max_new_tokens=12)  # no draft needed
    assert looked.token_ids == alone.generate("hi", method="target", max_new_tokens=12).token_ids
    for method in ("spd", "spd-lookup"):
        with pytest.raises(cospec.CospecError, match="needs a draft model: load_pair"):
            alone.generate("hi", method=method)
    with pytest.raises(cospec.CospecError, match="unknown dtype 'fp8'"):
        cospec.load_pair(str(tiny_dirs[0]), draft=False, dtype="fp8")
    with pytest.raises(cospec.CospecError, match="model not found"):
        cospec.load_pair("/no/such/model")
    with pytest.raises(cospec.CospecError, match="draft must be a model spec"):
        cospec.load_pair(str(tiny_dirs[0]), draft=True)
    with pytest.raises(cospec.CospecError, match="target must be a model spec"):
        cospec.load_pair("", draft=False)  # not the shipped target, loaded unasked
    with pytest.raises(cospec.CospecError, match="did you mean the shipped qwen2.5-coder-1.5b"):
        cospec.load_pair("qwen2.5-coder-1.5", draft=False)
    with pytest.raises(cospec.CospecError, match="draft_weights must be one of model, int8"):
        cospec.load_pair(str(tiny_dirs[0]), draft=False, draft_weights="int4")


def test_vocabularies_must_match(tiny_dirs, tmp_path):
    from tiny import save_tiny

    other = save_tiny(tmp_path / "other", 3, vocab=280)
    with pytest.raises(cospec.CospecError, match="different vocabularies"):
        cospec.load_pair(str(tiny_dirs[0]), str(other), "cpu")


@pytest.mark.parametrize("doc, name", [(DOC, "result"), (README, "out")])
def test_documented_snippet_runs(tiny_dirs, monkeypatch, capsys, doc, name):
    """The first python block of docs/api.md and of the README, run as written; only the
    shipped defaults are the tiny models here. ``name`` is the block's generate result."""
    code = re.search(r"```python\n(.*?)```", doc.read_text(), re.S).group(1)
    monkeypatch.setattr(models, "DEFAULT_TARGET", str(tiny_dirs[0]))
    monkeypatch.setattr(models, "DEFAULT_DRAFT", str(tiny_dirs[1]))
    scope: dict = {}
    exec(compile(code, str(doc), "exec"), scope)
    loaded, result = scope["pair"], scope[name]
    assert loaded.models.target_name == str(tiny_dirs[0])
    assert loaded.models.draft_name == str(tiny_dirs[1])
    assert isinstance(result, cospec.Result) and result.stats.tokens > 0
    assert result.text in capsys.readouterr().out


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)


def test_import_cospec_is_light():
    """``import cospec`` loads no torch; the API arrives on first use."""
    res = run_python("""
        import sys
        import cospec
        assert "torch" not in sys.modules, "torch imported by import cospec"
        assert cospec.load_pair.__module__ == "cospec.api" and "torch" in sys.modules
        try:
            cospec.nothing
        except AttributeError:
            print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_core_install_needs_no_extras():
    """The API and the command line's parser import with the eval and serve extras' packages
    missing (they are imported where they are used, and say what to install)."""
    res = run_python("""
        import importlib.abc, sys

        EXTRAS = ("scipy", "matplotlib", "fastapi", "uvicorn", "starlette", "pydantic",
                  "openai", "httpx")

        class NoExtras(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in EXTRAS:
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, NoExtras())
        import cospec.api
        from cospec.cli import build_parser
        build_parser().parse_args(["generate", "--prompt", "hi"])
        from cospec import report
        from cospec.errors import CospecError
        try:
            report.wilson(3, 10)
        except CospecError as err:
            assert "pip install 'cospec[eval]'" in str(err), err
            print("ok")
    """)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_an_option_the_method_does_not_read_is_warned_of(pair):
    """lam with spd: a warning naming the methods that read it (the tokens are spd's); no
    warning for an option the method reads."""
    with pytest.warns(UserWarning, match="lam is read by we, we-sd, cos-we only: method spd "
                                         "ignores it"):
        warned = pair.generate("w5 w9", method="spd", max_new_tokens=4, lam=0.3)
    assert warned.token_ids == pair.generate("w5 w9", method="spd", max_new_tokens=4).token_ids
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pair.generate("w5 w9", method="we", max_new_tokens=4, lam=0.3)
