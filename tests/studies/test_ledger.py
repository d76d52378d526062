"""The claims ledger's command line: Markdown and LaTeX tables of every claim."""

import subprocess
import sys

from studies import ledger
from studies._common import REPO
from studies.ledger import CLAIMS, Claim, Verdict


def test_markdown_has_one_row_per_claim_with_its_deciding_test():
    lines = ledger.to_markdown().splitlines()
    assert lines[0] + "\n" == ledger.MARKDOWN_HEADER
    assert lines[1].startswith("| id |") and set(lines[2]) <= {"|", "-"}
    rows = lines[3:]
    assert len(rows) == len(CLAIMS)
    for row, c in zip(rows, CLAIMS):
        assert row.startswith(f"| {c.id} | {c.topic} |")
        assert f"`{c.test}`" in row and f"| {c.verdict.value} |" in row


def test_latex_is_a_booktabs_table_with_special_characters_escaped():
    odd = Claim("X1", "demo", "nota", "a & b at 50% of x_1 {y} #2 $3", Verdict.TRUE,
                "~ and ^ and \\", "test_claim_X1")
    text = ledger.to_latex((odd,) + CLAIMS)
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\label{tab:claims}"):
        assert text.count(rule) == 1
    assert (r"X1 & a \& b at 50\% of x\_1 \{y\} \#2 \$3 & true & "
            r"\textasciitilde{} and \textasciicircum{} and \textbackslash{} \\") in text
    body = text.split("\\midrule\n")[1].split("\n\\bottomrule")[0].splitlines()
    assert len(body) == 1 + len(CLAIMS)
    assert all(line.count(" & ") == 3 and line.endswith("\\\\") for line in body)


def test_cli_prints_markdown_and_writes_latex_to_a_file(tmp_path):
    done = subprocess.run([sys.executable, "-m", "studies.ledger"], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout == ledger.to_markdown()
    out = tmp_path / "tables" / "claims.tex"
    assert ledger.main(["--latex", "--out", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == ledger.to_latex()


def test_force_replaces_a_table_this_command_wrote_and_no_hand_written_one(tmp_path, capsys):
    """A hand-written Markdown table with the ledger's own columns begins as the ledger's
    did before it had a marker line: --force never replaces it (it did), and replaces a
    table this command wrote, Markdown or LaTeX."""
    mine, hand = tmp_path / "claims.md", tmp_path / "notes.md"
    assert ledger.main(["--out", str(mine)]) == 0
    assert ledger.main(["--out", str(mine), "--force"]) == 0
    assert mine.read_text(encoding="utf-8") == ledger.to_markdown()
    written = ("| id | topic | claim | verdict | when it holds, or why not | decided by |\n"
               "|---|---|---|---|---|---|\n| my | own | notes | | | |\n")
    assert ledger.to_markdown().splitlines(True)[1] == written.splitlines(True)[0]
    hand.write_text(written, encoding="utf-8")
    assert ledger.main(["--out", str(hand), "--force"]) == 2
    assert "did not write" in capsys.readouterr().err
    assert hand.read_text(encoding="utf-8") == written
    tex = tmp_path / "claims.tex"
    assert ledger.main(["--latex", "--out", str(tex)]) == 0
    assert ledger.main(["--latex", "--out", str(tex), "--force"]) == 0
