"""scripts/gpu_poll.sh: a poll shows the queue log's tail and brings the results back."""

import os
import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_poll.sh"


def test_poll_packs_the_results_but_not_the_queues_copies(tmp_path):
    """The results under $R (not the queues' repository copies) land in $OUT/r.tgz, and the
    log's last lines are printed."""
    r, out = tmp_path / "r", tmp_path / "out"
    (r / "repo-AB12" / "cospec").mkdir(parents=True)
    (r / "speed").mkdir()
    out.mkdir()
    (r / "speed" / "gpu_speed.json").write_text("{}")
    (r / "queue.log").write_text("=== a\n--- a exit 0\n=== b\n")
    done = subprocess.run(["bash", str(SCRIPT), "0", "2"], capture_output=True, text=True,
                          env=os.environ | {"R": str(r), "OUT": str(out)}, check=True)
    assert done.stdout.splitlines() == ["--- a exit 0", "=== b"]
    with tarfile.open(out / "r.tgz") as tar:
        names = {n.lstrip("./") for n in tar.getnames()} - {""}
    assert names == {"speed", "speed/gpu_speed.json", "queue.log"}
