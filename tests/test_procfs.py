"""The CPU name a benchmark's header carries: the model and the flags that decide kernels."""

from __future__ import annotations

from mer.procfs import cpu_summary, kib_field


def test_the_cpu_is_named_with_the_kernel_flags_it_has(tmp_path):
    info = tmp_path / "cpuinfo"
    one = "model name\t: Intel(R)  Xeon(R) Processor\n"
    one += "flags\t\t: fpu avx2 avx512_vnni amx_int8 amx_bf16\n"
    info.write_text(one + "\n" + one)  # a block per logical CPU: the first one counts
    assert cpu_summary(info) == "Intel(R) Xeon(R) Processor (avx512_vnni amx_bf16 amx_int8)"
    info.write_text("model name\t: AMD Ryzen 7 5800X\nflags\t\t: fpu avx2\n")
    assert cpu_summary(info) == "AMD Ryzen 7 5800X"
    info.write_text("processor\t: 0\n")  # no model name (some ARM kernels)
    assert cpu_summary(info) == "unknown CPU"
    assert cpu_summary(tmp_path / "missing") == "unknown CPU"
    assert cpu_summary()  # this machine's, whatever it is


def test_a_kib_field_is_read_in_bytes_and_a_missing_one_is_none(tmp_path):
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmRSS:\t  2048 kB\n")
    assert kib_field(status, "VmRSS") == 2048 * 1024
    assert kib_field(status, "VmHWM") is None
    assert kib_field(tmp_path / "gone", "VmRSS") is None
