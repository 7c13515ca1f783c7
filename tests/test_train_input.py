"""``cospec train`` on bad input: a clear one-line error naming the file, line or flag (never
a traceback, never an arbiter trained on wrong data or written where its report goes)."""

import gzip
import json
import random
from pathlib import Path

import pytest

from cospec.arbiter import FEATURES, arbiter_info
from cospec.cli import main

PAIR = ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b")


def records(problems: int = 12, per: int = 3, seed: int = 0) -> list[dict]:
    """Collect's records for ``problems`` problems: one per problem, ``per`` points each."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for i in range(problems):
        tc = rng.random() < 0.5
        recs.append({"id": f"gsm8k/{i}", "target_correct": tc, "tokens": 5})
        recs += [{"id": f"gsm8k/{i}", "position": j, "target_correct": tc,
                  "draft_correct": rng.random() < 0.5, "control_correct": False,
                  "features": [round(rng.gauss(0, 1), 5) for _ in FEATURES]}
                 for j in range(per)]
    return recs


def shard_text(recs: list[dict]) -> str:
    return json.dumps({"shard_seconds": 1.0}) + "\n" + "".join(json.dumps(r) + "\n"
                                                              for r in recs)


def collect_dir(path: Path, pair: tuple[str, str] | None = PAIR, text: str | None = None,
                raw: bytes | None = None) -> Path:
    """A folder as cospec collect leaves it: meta.json naming ``pair`` and one shard holding
    ``text`` (default: valid records), or exactly the bytes ``raw``."""
    path.mkdir(parents=True)
    if pair:
        (path / "meta.json").write_text(json.dumps({"task": "gsm8k", "split": "dev",
                                                    "target": pair[0], "draft": pair[1]}))
    shard = path / "shard-0000.jsonl.gz"
    if raw is not None:
        shard.write_bytes(raw)
    else:
        with gzip.open(shard, "wt") as fh:
            fh.write(shard_text(records()) if text is None else text)
    return path


def train(capsys, *args) -> tuple[int, str, str]:
    """``cospec train ARGS --epochs 1``: exit status (an argparse refusal's too), stdout,
    stderr."""
    try:
        rc = main(["train", *map(str, args), "--epochs", "1"])
    except SystemExit as stop:
        rc = stop.code
    out, err = capsys.readouterr()
    return rc, out, err


def refused(capsys, *args) -> str:
    """The one error line of a ``cospec train`` that must fail with status 2."""
    rc, _, err = train(capsys, *args)
    assert rc == 2, err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


def point_with(**change) -> str:
    """A shard whose third divergence point (line 5 of the file) has ``change`` applied."""
    recs = records()
    recs[3] = {**recs[3], **change}
    assert "position" in recs[3]
    return shard_text(recs)


GOOD = shard_text(records())
CUT_GZIP = gzip.compress(GOOD.encode())[:-30]


@pytest.mark.parametrize("text,raw,where,what", [
    (GOOD[:-20], None, "line 49", "not valid JSON"),                  # the last line cut
    (GOOD.replace('"position": 1', '"position": 1, bad', 1), None, "line 4", "not valid JSON"),
    (GOOD + "[1, 2]\n", None, "line 50", "not a JSON object"),
    (point_with(features=[0.5, 1.0, 2.0]), None, "line 5", f"3 features, the arbiter takes "
                                                          f"{len(FEATURES)}"),
    (point_with(features=[float("nan")] * len(FEATURES)), None, "line 5", "not all finite"),
    (point_with(features=["x"] * len(FEATURES)), None, "line 5", "not all finite"),
    (point_with(draft_correct="yes"), None, "line 5", "draft_correct is 'yes'"),
    (point_with(id=None), None, "line 5", "without a problem id"),
    (None, b"hello\n", "", "not a readable gzip shard"),
    (None, CUT_GZIP, "", "not a readable gzip shard"),
], ids=["cut-last-line", "bad-json", "not-an-object", "feature-count", "nan-feature",
        "text-feature", "grade", "no-id", "not-gzip", "cut-gzip"])
def test_a_damaged_shard_is_named_with_its_line(tmp_path, capsys, text, raw, where, what):
    data = collect_dir(tmp_path / "data", text=text, raw=raw)
    arb = tmp_path / "arb.safetensors"
    line = refused(capsys, "--data", data, "--out", arb)
    shard = str(data / "shard-0000.jsonl.gz")
    assert line.startswith(f"error: {shard} {where}".rstrip()) and what in line, line
    assert not arb.exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--lr", "-1", "> 0"), ("--lr", "nan", "> 0"), ("--lr", "0", "> 0"),
    ("--hidden-units", "-1", ">= 0"),
    ("--epochs", "0", "> 0"), ("--epochs", "-5", "> 0"),
    ("--threshold", "2", "in [0, 1]"), ("--threshold", "nan", "in [0, 1]"),
    ("--val-fraction", "0", "in (0, 1)"), ("--val-fraction", "1", "in (0, 1)"),
    ("--val-fraction", "1.5", "in (0, 1)"), ("--val-fraction", "-0.5", "in (0, 1)"),
    ("--val-fraction", "nan", "finite"), ("--val-fraction", "x", "not a number"),
    ("--speed-bonus", "nan", "finite"), ("--speed-bonus", "inf", "finite"),
    ("--seed", str(2**64), "2^63"),
])
def test_bad_settings_are_refused_naming_the_flag(tmp_path, capsys, flag, value, message):
    data = collect_dir(tmp_path / "data")
    arb = tmp_path / "arb.safetensors"
    line = refused(capsys, "--data", data, "--out", arb, f"{flag}={value}")
    assert f"argument {flag}:" in line and message in line, line
    assert not arb.exists()


def test_a_negative_speed_bonus_and_seed_are_fine(tmp_path, capsys):
    data = collect_dir(tmp_path / "data")
    rc, _, err = train(capsys, "--data", data, "--out", tmp_path / "a.safetensors",
                       "--speed-bonus=-0.1", "--seed=-3", "--hidden-units", "0",
                       "--val-fraction", "0.5")
    assert rc == 0, err


def test_out_that_is_a_folder_or_the_report_is_refused(tmp_path, capsys):
    data = collect_dir(tmp_path / "data")
    line = refused(capsys, "--data", data, "--out", tmp_path)
    assert f"--out {tmp_path} is a folder" in line, line
    for name in ("arb.json", "arb.JSON"):
        line = refused(capsys, "--data", data, "--out", tmp_path / name)
        assert "report is written beside it as .json" in line, line
        assert not (tmp_path / name).exists()
    (tmp_path / "arb.json").mkdir()
    line = refused(capsys, "--data", data, "--out", tmp_path / "arb.safetensors")
    assert f"the report {tmp_path / 'arb.json'}" in line, line
    assert not (tmp_path / "arb.safetensors").exists()


def test_the_arbiter_and_its_report_are_where_it_says(tmp_path, capsys):
    data = collect_dir(tmp_path / "data")
    for name, report in (("arb.safetensors", "arb.json"), ("plain", "plain.json")):
        rc, out, err = train(capsys, "--data", data, "--out", tmp_path / name)
        assert rc == 0, err
        assert f"arbiter -> {tmp_path / name} (report {tmp_path / report}," in out
        assert (arbiter_info(tmp_path / name)["target"], arbiter_info(tmp_path / name)["draft"]
                ) == PAIR
        assert json.loads((tmp_path / report).read_text())["settings"]["epochs"] == 1


def test_data_of_two_model_pairs_is_refused_naming_both(tmp_path, capsys):
    a = collect_dir(tmp_path / "a")
    b = collect_dir(tmp_path / "b", pair=PAIR[::-1])
    arb = tmp_path / "arb.safetensors"
    line = refused(capsys, "--data", a, b, "--out", arb)
    assert "mixes model pairs" in line, line
    assert f"{a / 'meta.json'} is target {PAIR[0]} / draft {PAIR[1]}" in line, line
    assert f"{b / 'meta.json'} is target {PAIR[1]} / draft {PAIR[0]}" in line, line
    assert not arb.exists()
    line = refused(capsys, "--data", a, b / "shard-0000.jsonl.gz", "--out", arb)
    assert "mixes model pairs" in line, line  # a shard file: its folder's meta.json


def test_data_of_one_pair_in_two_folders_trains_once_per_point(tmp_path, capsys):
    a = collect_dir(tmp_path / "a")
    b = collect_dir(tmp_path / "b", text=shard_text(records(seed=1)))
    reports = {}
    for name, data in (("ab", [a, b]), ("aa", [a, a, a / "shard-0000.jsonl.gz"]), ("a", [a])):
        rc, _, err = train(capsys, "--data", *data, "--out", tmp_path / f"{name}.safetensors")
        assert rc == 0, err
        assert arbiter_info(tmp_path / f"{name}.safetensors")["target"] == PAIR[0]
        r = json.loads((tmp_path / f"{name}.json").read_text())
        reports[name] = r["train"]["points"] + r["val"]["points"]
    assert reports == {"ab": 72, "aa": 36, "a": 36}


def test_a_meta_without_the_pair_is_a_clear_error(tmp_path, capsys):
    data = collect_dir(tmp_path / "data")
    (data / "meta.json").write_text(json.dumps({"task": "gsm8k"}))
    line = refused(capsys, "--data", data, "--out", tmp_path / "arb.safetensors")
    assert f"{data / 'meta.json'} does not name the model pair" in line, line


def test_too_few_problems_to_split_names_the_fraction(tmp_path, capsys):
    data = collect_dir(tmp_path / "data")
    line = refused(capsys, "--data", data, "--out", tmp_path / "arb.safetensors",
                   "--val-fraction", "0.001")
    assert "too few problems to split with --val-fraction 0.001 (12 problems, 36 points" in line
