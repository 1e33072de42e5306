"""The first logged losses of the tiny cpu_tiny run match tests/golden/cpu_tiny_losses.json.

A failure means the training numbers changed.  If that is intended: ``python -m tests.golden
--update`` and commit the reviewed diff of the golden file with the change.
"""
import pytest

import golden

REGENERATE = "intended? run `python -m tests.golden --update` and review the diff of tests/golden/"


@pytest.fixture(scope="module")
def golden_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    golden.write_dataset(root / "data")
    return root


def test_the_golden_file_describes_the_run_of_this_checkout():
    stored = golden.load()
    assert stored["overrides"] == golden.OVERRIDES and stored["synthetic_faces"] == golden.SYNTH, REGENERATE
    assert (stored["rtol"], stored["atol"]) == (golden.RTOL, golden.ATOL)
    assert sorted(stored["losses"]) == [str(w) for w in golden.WORLD_SIZES]
    assert all(len(v) == golden.STEPS for v in stored["losses"].values())


def test_the_comparison_flags_a_changed_loss_and_passes_rounding():
    want = golden.load()["losses"]["1"]
    assert golden.mismatches(list(want), want) == []
    nudged = [w * (1 + golden.RTOL / 10) for w in want]  # well inside the tolerance
    assert golden.mismatches(nudged, want) == []
    changed = list(want)
    changed[3] *= 1.01
    assert [line.split(":")[0] for line in golden.mismatches(changed, want)] == ["step 4"]
    assert golden.mismatches(want[:-1], want) == [f"{len(want) - 1} losses logged, {len(want)} stored"]
    assert golden.mismatches([float("nan")] + want[1:], want)[0].startswith("step 1:")


def test_golden_losses_one_process(golden_root):
    problems = golden.mismatches(golden.run(1, golden_root), golden.load()["losses"]["1"])
    assert not problems, "\n".join(["the training numbers changed (1 process):", *problems, REGENERATE])


@pytest.mark.slow
def test_golden_losses_two_processes(golden_root):
    problems = golden.mismatches(golden.run(2, golden_root), golden.load()["losses"]["2"])
    assert not problems, "\n".join(["the training numbers changed (2 processes):", *problems, REGENERATE])
