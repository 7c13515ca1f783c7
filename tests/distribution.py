"""Statistical checks shared by the exactness tests: sampled sequences against an exact joint."""

from scipy.stats import chisquare


def chi_square(counts: dict, probs: dict, n: int) -> float:
    """p-value of the observed counts against the probabilities, cells with an expected
    count under 5 pooled (smallest first) until every pooled cell reaches 5; the expected
    counts are renormalised to n (float32 probabilities may not sum to exactly 1)."""
    obs, exp, pool_o, pool_e = [], [], 0, 0.0
    for c in sorted(probs, key=probs.get):
        pool_o, pool_e = pool_o + counts.get(c, 0), pool_e + probs[c] * n
        if pool_e >= 5:
            obs.append(pool_o)
            exp.append(pool_e)
            pool_o, pool_e = 0, 0.0
    obs[-1] += pool_o  # the rest is pooled into the largest cell
    exp[-1] += pool_e
    return float(chisquare(obs, [e * n / sum(exp) for e in exp]).pvalue)


def marginal(table: dict, j: int) -> dict:
    """The j-th position's marginal of a table over sequences."""
    out: dict = {}
    for seq, v in table.items():
        out[seq[j]] = out.get(seq[j], 0) + v
    return out


def assert_follows(samples, probs: dict, new: int, alpha: float) -> None:
    """The sampled sequences (each of ``new`` tokens) follow the exact joint ``probs``: none
    of probability 0, and the joint and every position's marginal pass a chi-square test."""
    counts: dict[tuple[int, ...], int] = {}
    for ids in samples:
        counts[tuple(ids)] = counts.get(tuple(ids), 0) + 1
    n = sum(counts.values())
    outside = {c: k for c, k in counts.items() if c not in probs}
    assert not outside, f"sequences of probability 0 were sampled: {outside}"
    pvalues = [chi_square(counts, probs, n)]
    pvalues += [chi_square(marginal(counts, j), marginal(probs, j), n) for j in range(new)]
    assert min(pvalues) > alpha, f"p-values (joint, then positions): {pvalues}"


def exact_joint(next_probs, prompt: list[int], new: int) -> dict[tuple[int, ...], float]:
    """P(first ``new`` tokens) for every sequence of nonzero probability, by enumerating the
    prefixes: ``next_probs(ids [1, n]) -> [V]`` is the distribution sampled after ``ids``."""
    import torch

    joint = {(): 1.0}
    with torch.inference_mode():
        for _ in range(new):
            nxt = {}
            for prefix, mass in joint.items():
                r = next_probs(torch.tensor([prompt + list(prefix)]))
                for tok in r.nonzero().flatten().tolist():
                    nxt[prefix + (tok,)] = mass * float(r[tok])
            joint = nxt
    return joint
