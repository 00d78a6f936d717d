"""``polycom bench`` end to end on a tiny shape (correct files, not timings), and its input errors."""

import csv

import pytest

from polycom.cli import main


def test_bench_writes_csv_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "--tokens", "3", "--widths", "8", "--repeats", "1", "--no-compile"]
    assert main([*argv, "--mlp-tokens", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "kernels.csv").open()))
    assert {(r["op"], r["provider"]) for r in rows} == {
        (op, p) for op in ("polynorm", "polyrelu") for p in ("official", "ours")
    }
    assert all(float(r["fwd_ms"]) > 0 and float(r["saved_over_input"]) > 0 for r in rows)
    mlp = list(csv.DictReader((out / "mlp.csv").open()))
    assert [r["activation"] for r in mlp][:2] == ["swiglu", "polynorm"] and float(mlp[0]["over_swiglu"]) == 1
    markdown = (out / "bench.md").read_text()
    assert "| polynorm | 3 x 8 | ours |" in markdown and "Fresh process" in markdown
    assert sorted(p.name for p in out.iterdir()) == ["bench.md", "kernels.csv", "mlp.csv"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "gelu"], "--ops 'gelu'"),
        (["--dtype", "int8"], "--dtype 'int8'"),
        (["--device", "tpu"], "--device 'tpu'"),
        (["--repeats", "0"], "--repeats 0"),
    ],
)
def test_bench_rejects_bad_input(args, message, capsys):
    assert main(["bench", *args]) == 2
    assert message in capsys.readouterr().err
