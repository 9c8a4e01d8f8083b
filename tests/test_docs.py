"""The README is a front door and docs/ holds the rest: the README stays short, every relative
link in README.md and docs/*.md resolves (to a file, and for `#anchor` to a heading of that file,
by GitHub's anchor rule), every doc is reachable from the README, the configuration reference is
linked from it, and no user doc names one of this repo's issues ("issue 27")."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
MAX_README_LINES = 300

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")  # [text](target); images aside
FENCE = re.compile(r"^(```|~~~)")
# This repo's issues are written "issue 27"; a citation of another project's tracker keeps its
# "#" ("DiffSynth-Studio issue #435") and is allowed.
ISSUE = re.compile(r"\bissues?\s+\d+", re.IGNORECASE)


def user_docs() -> list[str]:
    return [README] + sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))


def prose(path: str) -> str:
    """The file without its fenced code blocks (a `[x](y)` inside code is no link)."""
    out, fenced = [], False
    for line in open(path, encoding="utf-8").read().splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return "\n".join(out)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lowercase, punctuation other than '-' and
    '_' removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: str) -> set[str]:
    """Every heading's anchor in `path`, with GitHub's -1, -2 ... suffixes for repeats."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path).splitlines():
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = github_anchor(m.group(2))
        n = seen.get(base, 0)
        out.add(base if n == 0 else f"{base}-{n}")
        seen[base] = n + 1
    return out


def relative_links(path: str) -> list[str]:
    return [t for t in LINK.findall(prose(path)) if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_anchor_rule_matches_githubs():
    assert github_anchor("Predict: `predict_advanced.py`") == "predict-predict_advancedpy"
    assert github_anchor("The held-out loss: `val/loss`") == "the-held-out-loss-valloss"
    assert github_anchor("First frames: image-to-video and long videos") == \
        "first-frames-image-to-video-and-long-videos"
    assert github_anchor("CPU threads (OpenMP)") == "cpu-threads-openmp"


def test_readme_is_a_front_door():
    lines = open(README, encoding="utf-8").read().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


@pytest.mark.parametrize("path", user_docs(), ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_resolves(path):
    broken = []
    for target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(dest):
            broken.append(f"{target}: no file {os.path.relpath(dest, ROOT)}")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
    assert not broken, f"{os.path.relpath(path, ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("path", user_docs(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_issue_numbers_in_user_docs(path):
    found = ISSUE.findall(open(path, encoding="utf-8").read())
    assert not found, f"{os.path.relpath(path, ROOT)} names issues {found}: say what holds, not its history"


def test_every_doc_is_reachable_from_the_readme():
    reached, todo = set(), [README]
    while todo:
        path = todo.pop()
        if path in reached:
            continue
        reached.add(path)
        for target in relative_links(path):
            file_part = target.partition("#")[0]
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part))
            if file_part and dest.endswith(".md") and os.path.exists(dest):
                todo.append(dest)
    missing = [os.path.relpath(p, ROOT) for p in user_docs() if p not in reached]
    assert not missing, f"not reachable from README.md: {missing}"


def test_readme_links_the_configuration_reference():
    targets = {t.partition("#")[0] for t in relative_links(README)}
    assert "docs/configuration.md" in targets
