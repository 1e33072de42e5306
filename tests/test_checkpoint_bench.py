"""bench/checkpoint_bench.py at a tiny size: the table has a sync and an async row with numbers."""
import re

from bench import checkpoint_bench


def test_checkpoint_bench_writes_both_rows(tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\n## Other\n\nkept\n")
    results = checkpoint_bench.main(["--classes", "2000", "--dim", "64", "--saves", "1",
                                     "--work-steps", "2", "--output", str(out)])
    text = out.read_text()
    assert "## Other\n\nkept" in text  # other sections left alone
    section = text.split("## Checkpoint stall", 1)[1]
    assert "load average" in section
    num = r"\d+\.\d+"
    for mode in ("sync", "async"):
        rows = re.findall(rf"^\| 2,000 \| fp32 \| {num} \| {mode} \| ({num}) \| ({num}) \|", section, re.M)
        assert len(rows) == 1, f"no {mode} row in\n{section}"
        stall, published = map(float, rows[0])
        assert stall > 0 and published >= stall
    r = results[0]
    assert r["async_published"] >= r["async_stall"] > 0
