"""Run the suite with trial and end with the plain line ``N passed, N failed``.

``python -m aico.dev.runtests [trial args…]``: trial's own output streams through;
its closing summary is turned into the line CI reads. The exit status is trial's
(non-zero on any failure or error), or 1 when no summary was found.
"""

from __future__ import annotations

import re
import subprocess
import sys

_SUMMARY = re.compile(r"^(PASSED|FAILED) \((.*)\)\s*$")
_COUNT = re.compile(r"(\w+)=(\d+)")


def summarize(line: str) -> tuple[int, int, int] | None:
    """(passed, failed, skipped) from trial's ``PASSED (...)``/``FAILED (...)`` line."""
    m = _SUMMARY.match(line.strip())
    if m is None:
        return None
    counts = {k: int(v) for k, v in _COUNT.findall(m.group(2))}
    passed = counts.get("successes", 0)
    failed = counts.get("failures", 0) + counts.get("errors", 0) + counts.get(
        "unexpectedSuccesses", 0
    )
    skipped = counts.get("skips", 0) + counts.get("expectedFailures", 0)
    return passed, failed, skipped


def main(argv: list[str]) -> int:
    cmd = [sys.executable, "-m", "twisted.trial", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # noqa: S603
    assert proc.stdout is not None
    result = None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        result = summarize(line) or result
    code = proc.wait()
    if result is None:
        print("0 passed, 1 failed  (no trial summary found)")
        return code or 1
    passed, failed, skipped = result
    print(f"{passed} passed, {failed} failed" + (f", {skipped} skipped" if skipped else ""))
    if code == 0 and failed:
        code = 1
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
