"""`mer bench kernel` times other schemes next to int4, in the same run, as ratios to it."""

from __future__ import annotations

import pytest

from mer.bench.kernel import kernel_bench
from mer.errors import ConfigError


def test_mxfp4_is_timed_next_to_int4(capsys):
    # 96 is no multiple of the asked group 128: int4 falls back to the group that fits.
    kernel_bench(96, 192, [1, 4], 128, 0.02, ("int4", "mxfp4"))
    out = capsys.readouterr().out
    assert "int4 g32" in out and "kernel: C" in out
    header = next(line for line in out.splitlines() if line.startswith("┃") and "tokens" in line)
    assert "mxfp4 ms" in header and "mxfp4/int4" in header
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]
    assert [r[0].strip() for r in rows] == ["1", "4"]
    for r in rows:
        ratio = r[-1].strip()
        assert ratio.endswith("x") and float(ratio[:-1]) > 0


def test_a_scheme_that_cannot_hold_the_shape_is_named():
    with pytest.raises(ConfigError, match="cannot hold a 96x200 expert as int4: down projection"):
        kernel_bench(96, 200, [1], 32, 0.01, ("int4", "mxfp4"))
    with pytest.raises(ConfigError, match="unknown scheme 'fp8'"):
        kernel_bench(96, 192, [1], 32, 0.01, ("fp8",))
