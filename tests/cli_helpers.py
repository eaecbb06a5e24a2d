"""Running the CLI in-process and checking its one-line errors (shared by the bad-input tests)."""

from quantloop.pipelines.cli import main


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, [ln for ln in err.splitlines() if ln.strip()]


def assert_one_line_error(code, lines, *needles):
    assert code == 2
    errors = [ln for ln in lines if ln.startswith("quantloop: error:")]
    assert len(errors) == 1, lines
    for n in needles:
        assert str(n) in errors[0], errors[0]
