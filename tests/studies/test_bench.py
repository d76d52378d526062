"""python -m studies.bench: the smoke preset measures every row."""


import pandas as pd

from studies import bench


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench"
    assert bench.main(["--smoke", "--pairs", "1", "--out", str(out)]) == 0
    frame = pd.read_csv(out / "bench.csv")
    measured = frame.ratio_median.notna()
    assert (frame.ratio_median[measured] > 0).all() and len(frame) >= 15
    # only a tiny float forward's memory growth may be 0 (a ratio that cannot be formed)
    assert set(frame[~measured].name) <= {n for n in frame.name if "peak memory" in n}
