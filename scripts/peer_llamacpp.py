"""llama.cpp as the CPU peer: greedy batch-1 decoding of token-id prompts on GGUF files, target
alone or with a draft GGUF (llama.cpp's own draft-model speculation), timed per prompt.

    python scripts/peer_llamacpp.py --prompts FILE.json --new 64 --target GGUF
        [--draft GGUF --k 4] --threads 2 --out FILE.json

``FILE.json`` holds ``{"prompts": [[ids...], ...]}`` (token ids, chat template already applied);
the output is the dict :func:`run` returns.

llama.cpp runs in this process through ``xllamacpp`` (a prebuilt wheel: ``pip install
xllamacpp``), which starts llama.cpp's server (``tools/server``) on a thread and listens on a
free port of 127.0.0.1. Each request goes to the server's native ``/completion`` endpoint over
that loopback socket, because it is the endpoint that returns the generated token ids
(``return_tokens``); ``Server.handle_completions`` (the in-process call) is the OpenAI
``/v1/completions`` dialect, which drops them. The loopback round trip costs about a
millisecond per request, against seconds of decoding.

Settings, chosen so that llama.cpp gets neither an edge nor a handicap against cospec:

- one slot (``n_parallel=1``), batch 1; ``n_ctx`` = longest prompt + new tokens + k + margin;
- no reuse of anything across prompts: ``cache_prompt`` false in every request and the host
  prompt cache off (``cache_ram_mib=0``), so each prompt is prefilled from scratch;
- greedy: temperature 0 with the sampler chain cut to ``top_k`` (k = 1);
- exactly ``new_tokens`` tokens: ``n_predict`` with ``ignore_eos``. llama.cpp implements
  ``ignore_eos`` as a logit bias of -inf on every end-of-generation token, so where the target's
  argmax is such a token it takes the next best one (a token-level difference from a decoder
  that emits the EOS id and carries on);
- ``threads`` threads for generation and for prompt processing, the draft model's included;
- draft length fixed at k: ``n_max = n_min = k`` and ``p_min = 0`` (no early stop of a draft on
  a low draft probability). llama.cpp also caps a draft at the tokens still to generate minus
  one and skips drafts shorter than ``n_min``, so the last few tokens of a request are decoded
  without a draft;
- everything else at xllamacpp's defaults (flash attention ``auto``, thread polling, mmap,
  ``n_batch``/``n_ubatch``), as a user would run it; :func:`run` records them in ``config``.

Timing: an untimed warm-up pass (the longest prompt, then every prompt, as ``peer_speed.py``
warms every engine), then each prompt timed end to end with
the wall clock around its request (prefill included). llama.cpp's own ``prompt_ms`` and
``predicted_ms`` are kept beside it; with a draft, the draft's own prefill falls in
``predicted_ms`` (llama.cpp runs it at the first draft).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from cospec.errors import CospecError

INSTALL_HINT = ("llama.cpp's Python binding xllamacpp is not installed: `pip install xllamacpp` "
                "(a prebuilt CPU wheel, nothing to compile)")
CTX_MARGIN = 16  # positions beyond prompt + new tokens + k, so that no draft is cut by n_ctx
CTX_STEP = 256  # n_ctx is rounded up to a multiple of this
REQUEST_TIMEOUT_S = 3600


def _xllamacpp():
    """The xllamacpp module, or CospecError saying how to install it."""
    try:
        import xllamacpp
    except ImportError:
        raise CospecError(INSTALL_HINT) from None
    return xllamacpp


def _check_inputs(prompts: list[list[int]], new_tokens: int, target_gguf: str,
                  draft_gguf: str | None, k: int, threads: int) -> None:
    """CospecError for anything :func:`run` cannot start with."""
    if not prompts:
        raise CospecError("no prompts given")
    for i, ids in enumerate(prompts):
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                              for t in ids):
            raise CospecError(f"prompt {i} is not a non-empty list of token ids")
    if new_tokens < 1:
        raise CospecError(f"new tokens must be >= 1, got {new_tokens}")
    if threads < 1:
        raise CospecError(f"threads must be >= 1, got {threads}")
    if draft_gguf is not None and k < 1:
        raise CospecError(f"draft length k must be >= 1, got {k}")
    for name, path in (("target", target_gguf), ("draft", draft_gguf)):
        if path is not None and not Path(path).is_file():
            raise CospecError(f"{name} GGUF not found: {path}")


def _params(xl, target_gguf: str, draft_gguf: str | None, k: int, threads: int, n_ctx: int):
    """xllamacpp CommonParams for one slot of greedy decoding on CPU (see the module doc)."""
    p = xl.CommonParams()
    p.model.path = str(target_gguf)
    p.hostnames = ["127.0.0.1"]
    p.port = 0  # any free port
    p.n_ctx = n_ctx
    p.n_parallel = 1
    p.kv_unified = False
    p.cache_prompt = False
    p.cache_ram_mib = 0
    p.n_cache_reuse = 0
    p.cpuparams.n_threads = threads
    p.cpuparams_batch.n_threads = threads
    if draft_gguf is not None:
        p.speculative.types = [xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_DRAFT_SIMPLE]
        d = p.speculative.draft
        d.mparams.path = str(draft_gguf)
        d.n_max = k
        d.n_min = k
        d.p_min = 0.0
        d.cpuparams.n_threads = threads
        d.cpuparams_batch.n_threads = threads
    return p


def _config(xl, p, draft_gguf: str | None, new_tokens: int) -> dict:
    """Every setting that shapes the run, read back from the params, and the versions."""
    cfg = {
        "engine": "llama.cpp (xllamacpp, in-process server, native /completion endpoint)",
        "xllamacpp_version": xl.__version__,
        "xllamacpp_revision": xl._version.get_versions().get("full-revisionid"),
        "llama_cpp_build": dict(xl.BUILD_INFO),
        "system_info": xl.get_system_info().strip(),
        "target_gguf": p.model.path,
        "draft_gguf": draft_gguf,
        "new_tokens": new_tokens,
        "n_ctx": p.n_ctx,
        "n_parallel": p.n_parallel,
        "n_batch": p.n_batch,
        "n_ubatch": p.n_ubatch,
        "threads": p.cpuparams.n_threads,
        "threads_batch": p.cpuparams_batch.n_threads,
        "thread_poll": p.cpuparams.poll,
        "flash_attn_type": p.flash_attn_type.name,
        "cache_prompt": False,
        "cache_ram_mib": p.cache_ram_mib,
        "warmup": "the longest prompt, then every prompt",
        "request": _request(None, new_tokens),
    }
    if draft_gguf is not None:
        d = p.speculative.draft
        cfg["speculative"] = {
            "types": [t.name for t in p.speculative.types],
            "n_max": d.n_max, "n_min": d.n_min, "p_min": d.p_min,
            "threads": d.cpuparams.n_threads, "threads_batch": d.cpuparams_batch.n_threads,
        }
    return cfg


def _request(ids: list[int] | None, new_tokens: int) -> dict:
    """The /completion body: greedy, exactly ``new_tokens`` tokens, no prompt cache; without
    the prompt when ``ids`` is None (for the config record)."""
    body = {
        "n_predict": new_tokens,
        "ignore_eos": True,
        "temperature": 0.0,
        "top_k": 1,
        "samplers": ["top_k"],
        "cache_prompt": False,
        "return_tokens": True,
        "stream": False,
    }
    if ids is not None:
        body["prompt"] = ids
    return body


def _post(base: str, path: str, body: dict) -> dict:
    """POST ``body`` as JSON to the in-process server; its JSON answer, or CospecError."""
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise CospecError(f"llama.cpp refused the request ({err.code}): "
                          f"{err.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as err:
        raise CospecError(f"llama.cpp's in-process server did not answer: {err}") from None


def _complete(base: str, ids: list[int], new_tokens: int) -> tuple[float, dict]:
    """Wall-clock seconds and llama.cpp's answer for one prompt; CospecError unless it
    generated exactly ``new_tokens`` tokens after prefilling exactly the given prompt (nothing
    taken from a cache)."""
    t0 = time.perf_counter()
    out = _post(base, "/completion", _request(ids, new_tokens))
    seconds = time.perf_counter() - t0
    if "error" in out:
        raise CospecError(f"llama.cpp error: {out['error']}")
    n_gen = out.get("tokens_predicted")
    if n_gen != new_tokens or len(out.get("tokens", [])) != new_tokens:
        raise CospecError(f"llama.cpp generated {n_gen} tokens, not {new_tokens} "
                          f"(stop_type {out.get('stop_type')!r})")
    timings = out.get("timings", {})
    if out.get("tokens_evaluated") != len(ids) or timings.get("prompt_n") != len(ids):
        raise CospecError(f"llama.cpp took a prompt of {out.get('tokens_evaluated')} tokens and "
                          f"prefilled {timings.get('prompt_n')}, not the {len(ids)} given "
                          "(a reused prompt cache or an added BOS)")
    return seconds, out


def _record(seconds: float, out: dict) -> dict:
    """One prompt's entry of ``per_prompt``."""
    timings = out.get("timings", {})
    rec = {
        "seconds": seconds,
        "tokens": out["tokens_predicted"],
        "token_ids": list(out["tokens"]),
        "prompt_tokens": out["tokens_evaluated"],
        "prompt_ms": timings.get("prompt_ms"),
        "predicted_ms": timings.get("predicted_ms"),
    }
    if "draft_n" in timings:
        rec["draft_n"] = timings["draft_n"]
        rec["draft_accepted"] = timings.get("draft_n_accepted")
    return rec


def run(prompts: list[list[int]], new_tokens: int, target_gguf: str, draft_gguf: str | None,
        k: int, threads: int) -> dict:
    """Decode every prompt (token ids) greedily for exactly ``new_tokens`` tokens with llama.cpp
    on ``target_gguf``, speculating with ``draft_gguf`` (draft length ``k``) when given.

    Returns ``{"per_prompt": [{"seconds", "tokens", "token_ids", "prompt_tokens", "prompt_ms",
    "predicted_ms"[, "draft_n", "draft_accepted"]}, ...], "config": {...}}``, one entry per
    prompt in order; ``seconds`` is the wall clock of the whole request. CospecError on bad
    input, a missing xllamacpp or a failed llama.cpp start or request.
    """
    _check_inputs(prompts, new_tokens, target_gguf, draft_gguf, k, threads)
    xl = _xllamacpp()
    spare = k if draft_gguf is not None else 0
    need = max(len(ids) for ids in prompts) + new_tokens + spare + CTX_MARGIN
    n_ctx = -(-need // CTX_STEP) * CTX_STEP
    params = _params(xl, target_gguf, draft_gguf, k, threads, n_ctx)
    config = _config(xl, params, draft_gguf, new_tokens)
    try:
        server = xl.Server(params)
    except RuntimeError as err:
        raise CospecError(f"llama.cpp could not start on {target_gguf}"
                          f"{' with draft ' + draft_gguf if draft_gguf else ''}: {err} "
                          "(its log above says why)") from None
    try:
        base = server.listening_address
        for ids in [max(prompts, key=len), *prompts]:  # warm-up, untimed: as peer_speed's
            _complete(base, ids, new_tokens)          # for every engine (the longest, then all)
        per_prompt = [_record(*_complete(base, ids, new_tokens)) for ids in prompts]
    finally:
        del server  # stops llama.cpp's server thread and frees the models
    return {"per_prompt": per_prompt, "config": config}


def _read_prompts(path: str) -> list[list[int]]:
    """The ``prompts`` list of a JSON file, or CospecError."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise CospecError(f"cannot read {path}: {err}") from None
    except json.JSONDecodeError as err:
        raise CospecError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise CospecError(f'{path} must hold {{"prompts": [[token ids...], ...]}}')
    return data["prompts"]


def main(argv: list[str] | None = None) -> int:
    """Command line: run, print a one-line summary per prompt, write the result as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help='JSON file {"prompts": [[ids...], ...]}')
    ap.add_argument("--new", type=int, required=True, help="tokens to generate per prompt")
    ap.add_argument("--target", required=True, help="target GGUF file")
    ap.add_argument("--draft", help="draft GGUF file (speculative decoding when given)")
    ap.add_argument("--k", type=int, default=4, help="draft length (with --draft)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", required=True, help="where to write the result JSON")
    args = ap.parse_args(argv)
    try:
        result = run(_read_prompts(args.prompts), args.new, args.target, args.draft, args.k,
                     args.threads)
        Path(args.out).write_text(json.dumps(result, indent=1))
    except CospecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for i, rec in enumerate(result["per_prompt"]):
        drafts = (f", draft {rec['draft_accepted']}/{rec['draft_n']} accepted"
                  if "draft_n" in rec else "")
        print(f"prompt {i}: {rec['tokens']} tokens in {rec['seconds']:.3f} s "
              f"({rec['tokens'] / rec['seconds']:.2f} tok/s){drafts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
