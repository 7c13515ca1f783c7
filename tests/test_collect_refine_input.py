"""Bad input to ``cospec collect`` and ``cospec refine``: refused with a one-line error before
the models load, and resumed runs that never lose, duplicate or mix finished work."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from cospec.cli import main

NO_MODEL = ["--target", "/nonexistent/target", "--draft", "/nonexistent/draft"]


def models(tiny_dirs) -> list[str]:
    t, d = tiny_dirs
    return ["--target", str(t), "--draft", str(d)]


def collect_args(tiny_dirs, out: Path, limit: int, *more: str) -> list[str]:
    return ["collect", *models(tiny_dirs), "--task", "gsm8k", "--split", "dev", "--limit",
            str(limit), "--max-new-tokens", "8", "--max-points", "2", "--shard-size", "2",
            "--batch-size", "4", "--out", str(out), *more]


def shard_ids(f: Path) -> list[str]:
    """The problem ids shard ``f`` holds, in order."""
    with gzip.open(f, "rt") as fh:
        recs = [json.loads(x) for x in fh][1:]
    return [r["id"] for r in recs if "position" not in r]


def records(f: Path) -> list[dict]:
    with gzip.open(f, "rt") as fh:
        return [json.loads(x) for x in fh][1:]


def folder_state(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.iterdir())}


@pytest.mark.parametrize("cmd, flag, value", [
    ("collect", "--shard-size", "0"), ("collect", "--shard-size", "-1"),
    ("collect", "--limit", "0"), ("collect", "--limit", "-1"),
    ("collect", "--max-points", "-1"), ("collect", "--batch-size", "0"),
    ("refine", "--limit", "0"), ("refine", "--limit", "-486"),
    ("refine", "--speed-bonus", "nan"), ("refine", "--lr", "nan"), ("refine", "--lr", "inf"),
])
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, cmd, flag, value):
    """Refused while parsing (an argparse error naming the flag), before any model loads:
    the models named do not exist, so a later check would report them instead."""
    argv = [cmd, *NO_MODEL, "--out", str(tmp_path / "o"), flag, value]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (b"not gzip", "is not a readable shard"),
    (gzip.compress(b'{"shard_seconds": 1}\n{"id": "someone else", "tokens": 3}\n'),
     "holds other problems than gsm8k/dev 0-1"),
], ids=["not-gzip", "foreign"])
def test_a_damaged_or_foreign_shard_is_named_before_loading(tmp_path, capsys, content,
                                                            message):
    out = tmp_path / "c"
    out.mkdir()
    (out / "shard-0000.jsonl.gz").write_bytes(content)
    assert main(["collect", *NO_MODEL, "--limit", "2", "--shard-size", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and "shard-0000.jsonl.gz" in err


def test_collect_resume_with_a_larger_limit_completes_the_partial_shard(tiny_dirs, tmp_path,
                                                                       capsys):
    """--limit 1 then 3 (shards of 2): shard 0 is completed (problem 0's records kept as
    they were), shard 1 added; a rerun changes nothing, a smaller --limit is refused."""
    from cospec.tasks import get_task

    ids = [p.id for p in get_task("gsm8k").problems("dev")[:3]]
    out = tmp_path / "c"
    assert main(collect_args(tiny_dirs, out, 1)) == 0
    first = records(out / "shard-0000.jsonl.gz")
    assert shard_ids(out / "shard-0000.jsonl.gz") == ids[:1]
    assert main(collect_args(tiny_dirs, out, 3)) == 0
    shards = sorted(out.glob("shard-*.jsonl.gz"))
    assert [shard_ids(f) for f in shards] == [ids[:2], ids[2:]]
    kept = records(shards[0])
    assert kept[:len(first)] == first  # kept first, as they were, and not redone
    assert [r for r in kept if r["id"] == ids[0]] == first
    before = folder_state(out)
    assert main(collect_args(tiny_dirs, out, 3)) == 0  # complete: nothing redone
    assert folder_state(out) == before
    capsys.readouterr()
    assert main(collect_args(tiny_dirs, out, 2)) == 2
    assert "beyond --limit 2; rerun with --limit 3" in capsys.readouterr().err
    assert folder_state(out) == before


def test_collect_refuses_a_resume_with_other_settings(tiny_dirs, tmp_path, capsys):
    """--no-chat and --dtype are recorded: a resume that changes them is refused, naming
    them, before the models load and with nothing written; --models naming the same two
    models resumes; three models are refused."""
    out = tmp_path / "c"
    assert main(collect_args(tiny_dirs, out, 1)) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["no_chat"] is False and meta["dtype"] == "float32"
    before = folder_state(out)
    for flags, named in ((["--no-chat"], "no_chat: False -> True"),
                         (["--dtype", "bfloat16"], "dtype: 'float32' -> 'bfloat16'")):
        capsys.readouterr()
        assert main(collect_args(tiny_dirs, out, 2, *flags)) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and named in err
        assert folder_state(out) == before
    t, d = tiny_dirs
    same = collect_args(tiny_dirs, out, 1)[5:]  # no --target / --draft
    assert main(["collect", "--models", f"{d},{t}", *same]) == 0
    assert folder_state(out) == before
    capsys.readouterr()
    assert main(["collect", "--models", f"{d},{d},{t}", *same]) == 2
    assert "--models takes two models" in capsys.readouterr().err


def test_refine_refuses_to_resume_from_another_arbiter(tiny_dirs, tmp_path, capsys):
    """A refinement resumes with the --arbiter it began from, or none; another one (same
    pair, other weights) is refused, naming both. Its seed is near 2^63 (the per-iteration
    generator's seed must not overflow)."""
    from cospec.arbiter import FEATURES, LearnedPolicy, arbiter_info, save_arbiter

    pair = (str(tiny_dirs[0]), str(tiny_dirs[1]))
    arbs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        arbs.append(tmp_path / f"a{seed}.safetensors")
        save_arbiter(LearnedPolicy(len(FEATURES), hidden_units=4), arbs[-1], pair)
    out = tmp_path / "r"
    common = ["refine", *models(tiny_dirs), "--task", "gsm8k", "--split", "dev", "--limit",
              "2", "--problems", "2", "--group", "2", "--max-new-tokens", "6",
              "--speed-bonus", "0.5", "--seed", str(2**63 - 1), "--out", str(out)]
    assert main([*common, "--arbiter", str(arbs[0]), "--iterations", "1"]) == 0
    capsys.readouterr()
    before = folder_state(out)
    assert main([*common, "--arbiter", str(arbs[1]), "--iterations", "2"]) == 2
    err = capsys.readouterr().err
    assert f"begun from {arbs[0]}" in err and f"not from --arbiter {arbs[1]}" in err
    assert folder_state(out) == before
    assert main([*common, "--arbiter", str(arbs[0]), "--iterations", "2"]) == 0
    assert main([*common, "--iterations", "3"]) == 0
    info = json.loads(arbiter_info(out / "arbiter.safetensors")["info"])
    assert [r["iteration"] for r in info["refine_history"]] == [0, 1, 2]
    before = folder_state(out)  # other prompts, draft length or dtype: another refinement
    for flags, name in ((["--no-chat"], "no_chat"), (["--k", "3"], "k"),
                        (["--dtype", "bfloat16"], "dtype")):
        assert main([*common, "--iterations", "4", *flags]) == 2
        assert f"other settings ({name})" in capsys.readouterr().err
    assert folder_state(out) == before
    assert info["refine_start"]["path"] == str(arbs[0])
