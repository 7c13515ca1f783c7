"""``scripts/schedule_bound.py``'s replay pieces on toy sequences: guesses from a task's
earlier outputs, and the device block's schedule with them."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import schedule_bound as sb  # noqa: E402


def test_earlier_outputs_propose_what_followed_the_longest_suffix_within_one_output():
    earlier = sb.Earlier()
    earlier.add([1, 2, 3, 4, 5])
    earlier.add([2, 3, 9, 8])
    assert earlier.propose([7, 2, 3], 2) == [9, 8]      # the latest occurrence of (2, 3)
    assert earlier.propose([1, 2, 3], 2) == [4, 5]      # the longest suffix wins, though
    #                                                     (2, 3) occurred later
    assert earlier.propose([4], 3) == [5]               # stops at its output's end
    assert earlier.propose([8], 3) == []                # nothing followed it
    assert earlier.propose([42], 3) == []               # never seen


def test_earlier_guesses_only_add_proposals_that_the_draft_would_make():
    """Along an output the draft always agrees with, guesses from an earlier identical
    output stand, so blocks are longer and fewer; a draft that never agrees gains nothing
    from them (the guesses stand only where the draft's own chain does)."""
    prompt, out = [50, 51], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]
    earlier = sb.Earlier()
    earlier.add(out)
    alone = sb.extended(prompt, out, out, 2, 4)
    helped = sb.extended(prompt, out, out, 2, 4, earlier)
    assert alone[1] == helped[1] == len(out) and helped[2] < alone[2]
    wrong = [t + 100 for t in out]  # a draft that never agrees
    assert sb.extended(prompt, wrong, out, 2, 4, earlier)[2] == len(out)
