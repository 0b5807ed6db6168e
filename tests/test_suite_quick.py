"""benchmarks/suite.py --quick is a smoke run: it must not replace the committed results."""
import hashlib
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRACKED = [ROOT / "benchmarks" / "RESULTS.md", ROOT / "benchmarks" / "suite_results.json",
           *sorted((ROOT / "benchmarks" / "plots").glob("*.png"))]


def _digests():
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in TRACKED if p.exists()}


@pytest.mark.slow
def test_quick_run_leaves_the_committed_results_alone(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.syspath_prepend(str(ROOT))
    import suite
    before = _digests()
    assert before, "the committed results are where the suite writes by default"
    assert suite.main(["--quick", "--methods", "dense", "routing", "combiner-fixed",
                       "--no-memory", "--no-accuracy", "--round-budget", "1"]) == 0
    assert _digests() == before, "a --quick run modified the committed results"
    log = capsys.readouterr().err
    assert "ra-suite-quick-" in log, "the quick run says where it wrote"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped: matplotlib is not installed" in log
    sys.modules.pop("suite", None)
