"""Assertions shared by the CLI tests."""


def one_line_error(result, text: str = "") -> str:
    """The command failed with exit code 2 and printed exactly one `error:` line (containing `text`)."""
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert "Traceback" not in result.output
    assert text in lines[0], lines[0]
    return lines[0]
