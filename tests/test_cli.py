"""The CLI layer: version, help, and one-line errors with a non-zero exit."""

from click.testing import CliRunner

from bigcode_deploy.cli import main


def test_version_and_help():
    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "bigcode-deploy, version" in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0 and "forward" in result.output


def test_forward_on_default_model_prints_candidates():
    result = CliRunner().invoke(main, ["forward", "--ids", "1,2,3", "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 3
    logits = [float(line.split("\t")[1]) for line in lines]
    assert logits == sorted(logits, reverse=True)


def test_bad_model_dir_is_one_line_and_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["forward", str(tmp_path / "missing")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output


def test_out_of_vocabulary_id_is_one_line():
    result = CliRunner().invoke(main, ["forward", "--ids", "1,99999"])
    assert result.exit_code == 2 and "token id 99999 is outside the vocabulary" in result.output
