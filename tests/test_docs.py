import re

import pytest

from tests.conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.+?)\n```", readme)
    assert len(commands) >= 2
    quickstart, tests = commands[0], commands[1]
    assert "-m deploy.quickstart" in quickstart
    assert "pytest" in tests
    assert tests in (ROOT / ".ci" / "run").read_text().splitlines()


def test_every_module_function_and_path_the_architecture_doc_names_exists():
    import importlib

    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    for path in set(re.findall(r"`(\w+/[\w/]+\.(?:py|yml))`", doc)):
        assert (ROOT / path).is_file(), path
    packages = "fgl_core|fgl_client|fgl_server|strategies|deploy|fgl_accel|fgl_mini"
    for dotted in set(re.findall(rf"`((?:{packages})(?:\.\w+)+)`", doc)):
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                target = importlib.import_module(".".join(parts[:cut]))
                break
            except ModuleNotFoundError:
                continue
        for name in parts[cut:]:
            assert hasattr(target, name), dotted
            target = getattr(target, name)


def test_the_code_keeps_the_documented_import_rules():
    allowed = {
        "fgl_core": set(),
        "fgl_client": {"fgl_core"},
        "strategies": {"fgl_core"},
        "fgl_server": {"fgl_core", "strategies"},
        "fgl_accel": set(),  # Flower's internals only; and no app package imports it
        "fgl_mini": {"fgl_core"},  # how the miniature generator is made; nothing imports it
    }
    ours = {"fgl_core", "fgl_client", "fgl_server", "strategies", "deploy", "benchmarks", "tests"}
    ours |= {"fgl_accel", "fgl_privacy", "fgl_mini"}
    for package, may in allowed.items():
        for path in (ROOT / package).rglob("*.py"):
            imported = re.findall(r"^\s*(?:from|import) (\w+)", path.read_text(), re.MULTILINE)
            wrong = {name for name in imported if name in ours} - may - {package}
            assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"


def test_no_module_of_ours_imports_itself_back_through_others():
    """No import circle (at module level or inside a function): each module can be read before
    the ones that import it."""
    import ast
    from graphlib import CycleError, TopologicalSorter

    packages = ["fgl_core", "fgl_client", "fgl_server", "strategies", "fgl_privacy", "deploy",
                "fgl_accel", "fgl_mini"]  # fmt: skip
    modules = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in packages
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        graph[name] = (imported & modules.keys()) - {name}
    try:
        TopologicalSorter(graph).prepare()
    except CycleError as err:
        pytest.fail(f"import circle: {' -> '.join(err.args[1])}")


def test_flower_records_are_used_only_where_the_architecture_doc_says():
    doc = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    rule = re.search(r"Flower records \(.*?A test\s+keeps this list", doc, re.S)
    assert rule, "docs/ARCHITECTURE.md has lost its rule on where Flower records are used"
    allowed = set(re.findall(r"`(\w+/(?:[\w/]+\.py)?)`", rule.group(0)))
    names = r"\b(?:Message|RecordDict|ArrayRecord|ConfigRecord|MetricRecord)\b"
    using = set()
    for package in ("fgl_core", "fgl_client", "fgl_server", "strategies", "fgl_privacy"):
        for path in (ROOT / package).rglob("*.py"):
            imports = re.findall(r"^\s*from flwr[\w.]* import (\([^)]*\)|.*)$", path.read_text(),
                                 re.MULTILINE)  # fmt: skip
            if any(re.search(names, imported) for imported in imports):
                using.add(str(path.relative_to(ROOT)))
    outside = {p for p in using if p not in allowed and not any(
        a.endswith("/") and p.startswith(a) for a in allowed)}  # fmt: skip
    assert not outside, f"Flower records used outside the documented places: {sorted(outside)}"


def test_strategies_holds_strategy_classes_only():
    """`strategies/` is Flower strategies, one class a file, and the factory that picks one:
    message exchange of the server's own (round 0, the secure sum, node waiting) lives in
    `fgl_server`."""
    import importlib
    import inspect

    from flwr.serverapp.strategy import Strategy

    for path in sorted((ROOT / "strategies").glob("*.py")):
        if path.stem in {"__init__", "build"}:
            continue
        module = importlib.import_module(f"strategies.{path.stem}")
        defined = [
            obj
            for obj in vars(module).values()
            if (inspect.isclass(obj) or inspect.isfunction(obj))
            and obj.__module__ == module.__name__
        ]
        assert len(defined) == 1, f"{path.name} defines {[d.__name__ for d in defined]}"
        assert inspect.isclass(defined[0]) and issubclass(defined[0], Strategy), path.name


FIGURE = re.compile(r"\d(?:\.\d+)? ?(?:s|MB|KB|GB|GiB|images/s|captions/s|x)\b")


def figure_or_table_of_decimals(text: str) -> bool:
    return bool(FIGURE.search(text) or re.search(r"^\|.*\d\.\d", text, re.MULTILINE))


# the docs whose sections are checked, and what makes a section hold a measured figure: in
# measurements.md any table or figure; elsewhere a figure with a unit or a table of decimals
MEASURED = {
    "measurements.md": lambda text: bool("\n|" in text or FIGURE.search(text)),
    "privacy.md": figure_or_table_of_decimals,
    "experiments.md": figure_or_table_of_decimals,
    "server.md": figure_or_table_of_decimals,
    "adaptation.md": figure_or_table_of_decimals,
    "deployment.md": figure_or_table_of_decimals,
    "fgl-mini.md": lambda text: bool(FIGURE.search(text)),  # its tables' decimals are settings
    "reliability.md": lambda text: bool(FIGURE.search(text)),  # so are its table's
}
# where a Source line may point: a benchmark's JSON, or a miniature model's training record,
# shipped beside it (which names no commit: the Source line gives one)
KEPT = r"`((?:benchmarks/results|fgl_core/mini/\w+)/[\w.-]+\.json)`"


def doc_sections(name: str) -> list[tuple[str, str]]:
    """(heading, text) of each section of docs/`name`, headings of levels 2-4."""
    doc = (ROOT / "docs" / name).read_text()
    parts = re.split(r"^(#{2,4} .+)$", doc, flags=re.MULTILINE)
    return list(zip(parts[1::2], parts[2::2], strict=True))


@pytest.mark.parametrize("name", sorted(MEASURED))
def test_every_measured_figure_names_its_benchmark_and_kept_json(name):
    """Each section that holds a figure has a Source line: the command (a module of benchmarks/,
    the privacy report, a deploy/ command or a miniature model's training program) and the JSON
    it wrote, kept in the repo, whose commit and date the line repeats; or, for figures measured
    before JSONs were kept, the commit, the date and the words "JSON not kept"."""
    import json

    checked = 0
    for heading, text in doc_sections(name):
        if not MEASURED[name](text):
            continue
        sources = re.findall(r"^Source: (.+(?:\n(?!\n).+)*)", text, re.MULTILINE)
        assert sources, f"{name} {heading}: figures without a 'Source:' line"
        for source in (" ".join(s.split()) for s in sources):  # one line, however wrapped
            modules = re.findall(
                r"python -m (benchmarks|fgl_privacy|deploy|fgl_mini)\.(\w+)", source
            )
            assert modules, f"{name} {heading}: {source!r} names no benchmark"
            for package, module in modules:
                assert (ROOT / package / f"{module}.py").is_file(), module
            kept = re.findall(KEPT, source)
            results = [k for k in kept if k.startswith("benchmarks/results/")]
            records = [k for k in kept if k not in results]  # training records: no commit inside
            checked += 1
            not_kept = "JSON not kept" in source
            assert not (not_kept and kept), f"{name} {heading}: kept and not kept"
            if not_kept or records:  # the line itself names the commit and the date
                assert re.search(r"\b[0-9a-f]{7}\b", source), f"{heading}: no commit"
                assert re.search(r"\d{4}-\d{2}-\d{2}", source), f"{heading}: no date"
            else:
                assert results, f"{name} {heading}: {source!r} names no JSON in benchmarks/results/"
            for path in records:  # the model it trained
                record = json.loads((ROOT / path).read_text())
                assert (ROOT / path).parent.name in ("weights", "captioner"), path
                assert record["name"] in ("fgl-mini", "fgl-mini-captioner"), path
            for path in results:
                record = json.loads((ROOT / path).read_text())
                assert record["commit"].split("-")[0] in source, (heading, path)
                assert record["date"] in source, (heading, path)
                benchmark = record["benchmark"]
                assert any(benchmark.startswith(m) for _, m in modules), (heading, path)
    assert checked >= 1, name  # the test reads the doc's Source lines at all


def test_every_kept_json_is_quoted_by_the_docs():
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert f"benchmarks/results/{path.name}" in docs, f"{path.name} is quoted nowhere"
