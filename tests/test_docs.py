"""The documents hold: every citation in the repository points into the repository, the README's
package tree and Extending match the code, and every `vitdeep …` line of the README parses.

The method's formulas, recipes and sources live in docs/method.md, in numbered sections that code
and tests cite as `docs/method.md §N` (or `§N.M`). A clone must have everything a file cites: no
file may name the team's private notes or a document outside the repository, and every section
cited must exist. Text checks over `git ls-files` and in-process `--help` parses: no torch, seconds.
"""

from __future__ import annotations

import re
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "method.md"

#: The private notes' names (a file of that name inside the repository would be fine).
NOTES = re.compile(r"[\w./-]*\b(?:reference|design)\.md\b")
#: The private notes' folder (`shared` then `seeds`, `hooks` or a note's name), wherever it is mounted.
OUTSIDE = re.compile(r"(?<![\w.-])shared[/](?:seeds|hooks|reference|design)\b")
#: An absolute filesystem path to a document (a URL's path is preceded by its host, so it does not match).
ABSOLUTE_DOC = re.compile(r"(?<![\w.:/~-])/(?:[\w.-]+/)+[\w.-]+\.(?:md|rst|txt|pdf)\b")
#: A relative Markdown link target.
MD_LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)\s#]+)(?:#[^)\s]*)?\)")
#: `method.md` followed by section numbers: `§2`, `§4.2`, `§1–§3`, `§1-3`, `§2 and §3`.
CITATION = re.compile(r"method\.md((?:\s*(?:§\s*\d+(?:\.\d+)?|[–-]\s*§?\d+(?:\.\d+)?|,|and|or))+)")
SECTION_NUMBER = re.compile(r"\d+(?:\.\d+)?")


@lru_cache(maxsize=1)
def tracked_texts() -> dict[str, str]:
    """Path → text of every tracked text file (binary files skipped)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    texts = {}
    for name in filter(None, listed.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.is_symlink():
            continue
        try:
            texts[name] = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
    return texts


def _lines(pattern: re.Pattern, keep=lambda name, match: True) -> list[str]:
    found = []
    for name, text in tracked_texts().items():
        for number, line in enumerate(text.splitlines(), 1):
            found += [f"{name}:{number}: {m.group(0)}" for m in pattern.finditer(line) if keep(name, m)]
    return found


def _exists(citing: str, target: str) -> bool:
    """A path named in `citing` exists in the repository, relative to the file or to the root."""
    candidates = ((ROOT / citing).parent / target, ROOT / target)
    return any(path.resolve().is_relative_to(ROOT) and path.exists() for path in candidates)


def method_sections() -> set[str]:
    """The numbers of docs/method.md's sections (`## N. …`) and subsections (`### N.M …`)."""
    text = METHOD.read_text(encoding="utf-8")
    return set(re.findall(r"^## (\d+)\. ", text, re.M)) | set(re.findall(r"^### (\d+\.\d+) ", text, re.M))


def test_no_file_cites_the_private_notes():
    found = _lines(NOTES, lambda name, m: not _exists(name, m.group(0)))
    assert not found, "files cite notes a clone does not have (write what users need into docs/method.md):\n" + "\n".join(found)


def test_no_file_cites_a_path_outside_the_repository():
    found = _lines(OUTSIDE) + _lines(ABSOLUTE_DOC)
    found += _lines(MD_LINK, lambda name, m: name.endswith(".md") and not _exists(name, m.group(1)))
    assert not found, "files cite paths outside the repository:\n" + "\n".join(found)


def test_method_sections_are_numbered_in_order():
    text = METHOD.read_text(encoding="utf-8")
    top = [int(n) for n in re.findall(r"^## (\d+)\. ", text, re.M)]
    assert top == list(range(1, len(top) + 1)) and len(top) >= 7, top
    for section in re.findall(r"^### (\d+)\.(\d+) ", text, re.M):
        assert str(int(section[0])) in {str(n) for n in top}, section


def test_every_cited_section_exists():
    sections = method_sections()
    cited = []
    for name, text in tracked_texts().items():
        for number, line in enumerate(text.splitlines(), 1):
            for match in CITATION.finditer(line):
                cited += [(f"{name}:{number}", n) for n in SECTION_NUMBER.findall(match.group(1))]
    # docs/method.md cites its own sections as a bare `§N`
    for number, line in enumerate(METHOD.read_text(encoding="utf-8").splitlines(), 1):
        cited += [(f"docs/method.md:{number}", n) for n in re.findall(r"§\s*(\d+(?:\.\d+)?)", line)]
    missing = [f"{where}: §{n}" for where, n in cited if n not in sections]
    assert cited, "no file cites docs/method.md by section"
    assert not missing, "citations of sections docs/method.md does not have:\n" + "\n".join(missing)


def test_the_modules_that_hold_the_formulas_cite_their_sections():
    texts = tracked_texts()
    for module in ("vitdeep/losses.py", "vitdeep/analysis.py"):
        assert CITATION.search(texts[module]), f"{module} does not cite docs/method.md by section"
    assert "docs/method.md" in texts["README.md"], "the README does not link docs/method.md"


def test_the_checks_catch_what_they_are_for():
    """The patterns match the citations they exist to forbid, and spare URLs and in-repo paths."""
    notes = "see " + "reference" + ".md §2; " + "design" + ".md"
    assert len(NOTES.findall(notes)) == 2
    assert OUTSIDE.search("/work/" + "shared" + "/seeds/000" + ".txt") and OUTSIDE.search("the " + "shared" + "/hooks folder")
    assert not OUTSIDE.search("DATA=/" + "shared" + "/imagenet/train")  # a cluster's data path in an example
    assert ABSOLUTE_DOC.search("notes in /home/me/" + "notes.md") and not ABSOLUTE_DOC.search("https://github.com/a/b/README.md")
    assert [SECTION_NUMBER.findall(m.group(1)) for m in CITATION.finditer("docs/method.md §1–3 and docs/method.md §2 and §4.2")] == [
        ["1", "3"], ["2", "4.2"]]
    assert not _exists("docs/method.md", "../../outside.md") and _exists("docs/method.md", "../README.md")


#: The README's drawing of the package: from `    vitdeep/` to the first unindented line.
TREE = re.compile(r"^    vitdeep/\n((?:    .*\n|\n)+?)(?=\S)", re.M)
#: A module named on its own (`loop.py`), not as part of a path (`commands/recipes.py`).
MODULE = re.compile(r"(?<![\w/.])(\w+\.py)\b")


def readme_tree() -> dict[str, set[str]]:
    """Folder (`""` for the package itself) → the modules the README's Architecture tree names in it.

    An entry starts at the tree's first indent; a folder entry (`engine/`) lists its modules in
    its description and continuation lines, a file entry names its modules before the description."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = TREE.search(text[text.index("## Architecture"):])
    assert match, "README: no package tree under ## Architecture"
    entries: list[tuple[str, str]] = []
    for line in match.group(1).splitlines():
        if re.match(r"^      \S", line):
            name, _, description = line.strip().partition("   ")
            entries.append((name, description))
        elif line.startswith("       ") and entries:
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
    tree: dict[str, set[str]] = {"": set()}
    for name, description in entries:
        folders = re.findall(r"(\w+)/", name)
        if folders:
            for folder in folders:
                tree[folder] = set(MODULE.findall(description))
        else:
            tree[""] |= set(MODULE.findall(name))
    return tree


def package_modules(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}


def test_the_readme_tree_names_every_module_where_it_lives():
    """The Architecture section is a map a contributor can trust: every folder of the package and
    every module in it is drawn where it is, and nothing drawn is missing."""
    package = ROOT / "vitdeep"
    tree = readme_tree()
    folders = {p.name for p in package.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert set(tree) - {""} == folders, "README tree folders vs vitdeep/'s folders"
    assert tree[""] == package_modules(package), "README tree vs vitdeep/*.py"
    for folder in sorted(folders):
        if (package / folder / "__init__.py").exists():
            assert tree[folder] == package_modules(package / folder), f"README tree vs vitdeep/{folder}/*.py"


def test_the_extending_section_names_files_that_exist():
    """Every file the README's "Extending vitdeep" tells a contributor to touch exists."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("### Extending vitdeep"):text.index("## Development")]
    named = set(re.findall(r"`((?:[\w-]+/)*[\w-]+\.(?:py|yaml|md))`", section))
    assert named, "no file named in Extending"
    missing = sorted(name for name in named if not any((base / name).exists() for base in (ROOT, ROOT / "vitdeep")))
    assert not missing, f"README Extending names files that do not exist: {missing}"


def readme_commands() -> list[str]:
    """Every `vitdeep …` command line of the README's code blocks (indented or fenced), also as
    launched (`--module vitdeep …`, `-m vitdeep …`), with its continuation lines joined."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    commands, fenced, at = [], False, 0
    while at < len(lines):
        line = lines[at]
        if line.lstrip().startswith("```"):
            fenced = not fenced
        code = line[4:] if line.startswith("    ") else line if fenced else None
        match = code is not None and re.search(r"(?:^\s*(?:\$ )?|(?:--module|-m) )(vitdeep(?: .*)?)$", code)
        if match:
            command = match.group(1)
            while command.rstrip().endswith("\\") and at + 1 < len(lines):
                at += 1
                command = command.rstrip()[:-1] + " " + lines[at].strip()
            commands.append(command)
        at += 1
    return commands


def _as_argv(command: str) -> list[str]:
    """The arguments of a README command line, its placeholders left out: `# comments`, `[optional
    parts]`, `...`, and alternatives after `|` (the first is kept)."""
    import shlex

    words, depth = [], 0
    for word in shlex.split(command, comments=True)[1:]:
        if word == "|":
            break
        opened, closed = word.count("["), word.count("]")
        if depth or opened:
            depth += opened - closed
            continue
        if word not in ("...", "…"):
            words.append(word)
    return words


def test_every_readme_command_line_parses():
    """Each `vitdeep …` line of the README names a command and options that exist: run with
    `--help` appended, the command line parses (an unknown command or option exits 2)."""
    from vitdeep.cli import main

    commands = readme_commands()
    assert len(commands) >= 20, commands
    failed = []
    for command in commands:
        argv = _as_argv(command)
        try:
            main([*argv, "--help"])
        except SystemExit as done:
            if done.code not in (0, None):
                failed.append(f"{command}  →  exit {done.code}")
    assert not failed, "README command lines that do not parse:\n" + "\n".join(failed)


def test_readme_command_lines_are_found_and_cleaned():
    assert _as_argv("vitdeep models [NAME ...] [--img-size 224]   # the zoo") == ["models"]
    assert _as_argv("vitdeep shards SRC OUT | --demo OUT") == ["shards", "SRC", "OUT"]
    assert _as_argv('vitdeep analyze --compare "no losses=runs/plain" --out DIR') == ["analyze", "--compare", "no losses=runs/plain", "--out", "DIR"]
    with pytest.raises(SystemExit) as done:
        from vitdeep.cli import main

        main(["train", "--no-such-flag", "--help"])
    assert done.value.code == 2


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_readme_anchor_names_a_heading():
    """The table of contents and every `](#anchor)` link of the README land on a heading."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}
    anchors = set(re.findall(r"\]\(#([^)]+)\)", text))
    assert len(anchors) >= 15, anchors
    assert not sorted(anchors - headings), sorted(anchors - headings)


#: A file named in a table cell, in backticks: `docs/…`, `benchmarks/…`, `tests/…`.
TABLE_SOURCE = re.compile(r"`((?:docs|benchmarks|tests)/[\w./-]+)`")
#: An older version's figure: the commit whose README reported it.
TABLE_COMMIT = re.compile(r"\bcommit [0-9a-f]{7,40}\b")


def _readme_table(heading: str) -> list[list[str]]:
    """The cells of the first table under `### heading`, header and rule left out."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split(f"\n### {heading}\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_every_wall_time_names_its_date_machine_and_source():
    """The README's measured wall times are a table, each row with an ISO date, a machine named in
    the section's preamble, and a source a clone can open: a file of the repository, or the commit
    whose README reported an older version's figure."""
    rows = _readme_table("Wall times")
    assert len(rows) >= 10, rows
    for job, wall, date, machine, source in rows:
        if "[Development](#development)" in wall:
            continue
        assert wall and re.fullmatch(r"\d{4}-\d{2}-\d{2}", date), (job, wall, date)
        assert machine.split(",")[0] in ("Intel Xeon", "AMD EPYC"), (job, machine)
        files = TABLE_SOURCE.findall(source)
        assert files or TABLE_COMMIT.search(source), (job, source)
        assert all((ROOT / name).exists() for name in files), (job, source)
