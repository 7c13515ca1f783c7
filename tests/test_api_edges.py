"""The Python API at its edges: a top-p below float32's smallest number keeps the top token
(not a nan distribution), a device block never drafts past the tokens asked, a chat template
that refuses messages, a folder without a tokenizer, and options of the wrong kind are clear
CospecErrors; a stream's finish_reason waits for its end; generated ids past the tokenizer's
vocabulary are kept, with one warning."""

import json
import warnings

import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

import cospec
from cospec import fast_block, methods
from cospec.cli import main
from cospec.errors import CospecError
from cospec.sampling import SamplingConfig, probabilities


@pytest.fixture(scope="module")
def pair(tiny_dirs):
    return cospec.load_pair(str(tiny_dirs[0]), str(tiny_dirs[1]), "cpu")


def test_a_vanishing_top_p_keeps_the_top_token():
    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 0.1, -2.0]])
    probs = probabilities(logits, SamplingConfig(1.0, top_p=1e-46))
    assert torch.equal(probs, torch.nn.functional.one_hot(logits.argmax(-1), 3).float())


@pytest.mark.parametrize("method", ["target", "spd", "cos-we"])
def test_generate_at_a_vanishing_top_p_gives_the_greedy_tokens(pair, method):
    greedy = pair.generate("the answer is", method=method, max_new_tokens=10, chat=False)
    tiny = pair.generate("the answer is", method=method, max_new_tokens=10, chat=False,
                         temperature=1.0, top_p=1e-46, seed=3)
    assert tiny.token_ids == greedy.token_ids


def test_a_device_block_drafts_at_most_the_tokens_left(pair, monkeypatch):
    seen = []
    monkeypatch.setattr(methods.Method, "device_block", lambda self, ids, sampling: True)
    monkeypatch.setattr(fast_block, "stream", lambda *a, k, **kw: seen.append(k) or iter(()))
    for k, new, want in ((10**6, 16, 15), (4, 16, 4), (3, 1, 1)):
        built = methods.build_method("spd", pair.models)
        list(built.stream([5, 9], k=k, max_new_tokens=new, sampling=SamplingConfig(),
                          eos_ids=()))
        assert seen[-1] == want


def test_a_chat_template_that_refuses_the_messages_is_a_clear_error(tiny_dirs):
    own = cospec.load_pair(str(tiny_dirs[0]), False, "cpu")
    own.tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] not in ['user', 'assistant'] %}"
        "{{ raise_exception('Conversation roles must be user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}")
    with pytest.raises(CospecError, match="chat template refuses these messages: "
                                          "Conversation roles"):
        own.generate([{"role": "bogus", "content": "hi"}], method="target", max_new_tokens=2)


def test_a_model_folder_without_a_tokenizer_is_refused(tmp_path):
    tiny_model(1, vocab=300, dtype=torch.float32).save_pretrained(tmp_path)
    with pytest.raises(CospecError, match="has no tokenizer"):
        cospec.load_pair(str(tmp_path), False, "cpu")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="we", weights=(0.3, 0.7), lam=0.9), "not both"),
    (dict(method="cospec", every_mismatch="no"), "every_mismatch must be True or False"),
    (dict(chat="no"), "chat must be True or False"),
    (dict(chat=None), "chat must be True or False"),
])
def test_options_of_the_wrong_kind_are_refused(pair, kwargs, message):
    with pytest.raises(CospecError, match=message):
        pair.generate("hello", max_new_tokens=2, **kwargs)


def test_an_unhashable_dtype_is_refused(tiny_dirs):
    with pytest.raises(CospecError, match="unknown dtype"):
        cospec.load_pair(str(tiny_dirs[0]), False, "cpu", dtype=["float32"])


def test_a_batch_row_at_a_vanishing_top_p_keeps_its_top_token():
    """The batch engines' per-row processing (the server's) keeps it too."""
    from cospec.row_sampling import RowSampling, row_probabilities

    logits = torch.tensor([[3.0, 1.0, 2.5], [0.0, 0.1, -2.0]])
    s = RowSampling(temp=torch.ones(2), top_k=torch.full((2,), 3), top_p=torch.tensor([1e-46, 0.5]),
                    greedy=torch.zeros(2, dtype=torch.bool), all_greedy=False, any_greedy=False,
                    any_top_k=False, any_top_p=True)
    probs = row_probabilities(logits, s)
    assert torch.isfinite(probs).all()
    assert torch.equal(probs[0], torch.tensor([1.0, 0.0, 0.0]))


def test_token_ids_of_numpy_or_torch_and_a_path_target_are_taken(pair, tiny_dirs):
    import numpy as np

    ids = [5, 9, 12, 40]
    want = pair.generate(ids, method="target", max_new_tokens=6).token_ids
    for given in (tuple(ids), list(np.array(ids)), list(torch.tensor(ids))):
        assert pair.generate(given, method="target", max_new_tokens=6).token_ids == want
    with pytest.raises(CospecError, match="token ids"):
        pair.generate([np.int64(5), np.int64(10**9)], method="target", max_new_tokens=2)
    by_path = cospec.load_pair(tiny_dirs[0], False, "cpu")
    assert by_path.generate(ids, method="target", max_new_tokens=6).token_ids == want


def test_a_stream_has_no_finish_reason_until_it_is_read_to_its_end(pair):
    run = pair.stream("the answer is", method="spd", max_new_tokens=6, chat=False)
    assert run.finish_reason is None  # nothing read yet
    for _ in run:
        assert run.finish_reason is None  # mid-stream: not finished
    done = pair.generate("the answer is", method="spd", max_new_tokens=6, chat=False)
    assert run.token_ids == done.token_ids
    assert run.finish_reason == done.finish_reason
    assert run.finish_reason == ("length" if len(run.token_ids) == 6 else "stop")


@pytest.fixture(scope="module")
def padded_dirs(tmp_path_factory):
    """A tiny target and draft whose output layers have 20 rows past the tokenizer's
    vocabulary (padding, as Qwen2.5's 151936 rows for 151665 tokens), each twice a real
    row, so that greedy decoding picks them most of the time."""
    root, tok = tmp_path_factory.mktemp("padded"), tiny_tokenizer()
    vocab, extra = len(tok), 20
    dirs = []
    for name, seed, layers in (("target", 1, 2), ("draft", 2, 1)):
        model = tiny_model(seed, layers=layers, vocab=vocab + extra, dtype=torch.float32)
        with torch.no_grad():
            w = model.lm_head.weight
            w[vocab:] = 2 * w[2:2 + 3 * extra:3]
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        dirs.append(root / name)
    return dirs


def outside_warnings(caught: list) -> list[str]:
    """The messages of the warnings in ``caught`` about ids past the tokenizer's vocabulary."""
    return [str(w.message) for w in caught
            if "outside the tokenizer's vocabulary" in str(w.message)]


def test_ids_past_the_tokenizer_are_kept_and_warned_of_once(padded_dirs, capsys):
    padded = cospec.load_pair(str(padded_dirs[0]), str(padded_dirs[1]), "cpu")
    vocab = len(padded.tokenizer)
    runs = {}
    for method in ("target", "spd"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs[method] = padded.generate("the answer is", method=method, max_new_tokens=12,
                                           chat=False)
        ids = runs[method].token_ids
        outside = sum(i >= vocab for i in ids)
        assert 0 < outside < len(ids)  # some padding rows, some real tokens
        assert outside_warnings(caught) == [  # one warning for the generation, not per token
            f"{outside} generated token id(s) are outside the tokenizer's vocabulary of size "
            f"{vocab} (the model's output layer is larger) and decode to no text"]
    assert runs["spd"].token_ids == runs["target"].token_ids  # generation is unchanged
    with warnings.catch_warnings(record=True) as caught:  # a stream: each such token has ""
        warnings.simplefilter("always")
        tokens = list(padded.stream("the answer is", max_new_tokens=12, chat=False))
    assert [t.id for t in tokens] == runs["target"].token_ids
    assert all(t.text == "" for t in tokens if t.id >= vocab)
    assert len(outside_warnings(caught)) == 1
    with warnings.catch_warnings(record=True) as caught:  # generate --json warns as well
        warnings.simplefilter("always")
        assert main(["generate", "--target", str(padded_dirs[0]), "--draft",
                     str(padded_dirs[1]), "--prompt", "the answer is", "--no-chat",
                     "--max-new-tokens", "12", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == runs["target"].token_ids
    assert len(outside_warnings(caught)) == 1
