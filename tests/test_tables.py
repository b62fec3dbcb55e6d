from seglab.tables import fmt, markdown_table, text_table, write_table


def test_numbers_and_tables_as_the_reports_print_them(tmp_path):
    assert fmt(0.123456) == "0.1235" and fmt(None) == "" and fmt(float("nan"), missing="-") == "-"
    assert fmt(12.345, ".1f") == "12.3"
    assert text_table([["a", "1.0"], ["long name", "10.25"]]) == "  a            1.0\n  long name  10.25"
    assert text_table([["k", "v"], ["key", "a value"]], right=False) == "  k    v\n  key  a value"
    rows = [{"job": "a", "mIoU": "0.5"}, {"job": "b"}]
    table = markdown_table(rows, ["job", "mIoU"])
    assert table == "| job | mIoU |\n|---|---|\n| a | 0.5 |\n| b |  |\n"
    assert write_table(tmp_path / "t", rows, ["job", "mIoU"]) == table == (tmp_path / "t.md").read_text()
    assert (tmp_path / "t.csv").read_text().splitlines() == ["job,mIoU", "a,0.5", "b,"]
