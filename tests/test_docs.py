import re

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) >= 2
    quickstart, tests = commands[0], commands[1]
    assert "-m deploy.quickstart" in quickstart
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()
