"""``attnkit explain-text --generate N``: the shipped character decoder by default, the token-by-token view in the
terminal and in the HTML report, contrastive foils, and one-line user errors (exit 2) before any work."""

import subprocess
import sys

import pytest

from attnkit.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_prints_one_line_per_generated_character(capsys, tmp_path):
    out_file = tmp_path / "gen.html"
    code, out, err = run(
        capsys, "explain-text", "The if statement", "def", "--generate", "6", "--top", "2", "--out", str(out_file)
    )
    assert code == 0, err
    assert "rollout: what each generated token draws on (char-decoder (pydoc_data), 6 tokens" in out
    blocks = out.split("\n\n")
    assert blocks[1].splitlines()[0].startswith("  'The if statement' -> ")
    rows = [line for line in out.splitlines() if " <- " in line]
    assert len(rows) == 12  # 6 generated characters x 2 prompts
    html = out_file.read_text()
    assert html.count('<table class="tokens">') == 2 and "The if statement" in html
    code, _, err = run(capsys, "explain-text", "x", "--generate", "2", "--out", str(out_file))
    assert code == 2 and "exists; pass --overwrite" in err


def test_attnlrp_through_the_cache(capsys):
    code, out, err = run(capsys, "explain-text", "while x", "--generate", "2", "--method", "attnlrp")
    assert code == 0, err
    assert "attnlrp: what each generated token draws on" in out and out.count(" <- ") == 2


def test_contrastive_foil_with_a_gradient_method(capsys):
    code, out, err = run(capsys, "explain-text", "for x in", "--generate", "3", "--method", "grad_input", "--foil", "e")
    assert code == 0, err
    assert "grad_input: what each generated token minus 'e' draws on" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--generate", "0"], "--generate must be in [1, 1024]"),
        (["--generate", "2", "--method", "flow"], "--method must be one of raw, rollout, grad_input, relevance"),
        (["--generate", "2", "--foil", "e"], "--foil needs a gradient method"),
        (["--foil", "e"], "--foil needs --generate N"),
        (["--generate", "2", "--method", "grad_input", "--foil", "ee"], "'ee' is not a single token"),
        (["--generate", "2", "--method", "raw", "--layer", "9"], "layer must be in [0, 4)"),
    ],
)
def test_user_errors_exit_2_in_one_line(capsys, argv, message):
    code, _, err = run(capsys, "explain-text", "hi", *argv)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_generate_as_a_real_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "attnkit.cli.main", "explain-text", "class", "--generate", "3", "--method", "raw"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "raw: what each generated token draws on" in done.stdout
