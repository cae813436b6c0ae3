import fnmatch
import posixpath

import pytest
from hypothesis import given, settings, strategies as st

from aipm.paths import PathError, Target, normalize, overlaps, segment_overlap


def t(raw: str) -> Target:
    return normalize(raw)


@pytest.mark.parametrize("raw,expected", [
    ("./a.py", "a.py"), ("src/../a.py", "a.py"), ("a//b.py", "a/b.py"), ("docs/", "docs"), (" x.py ", "x.py"),
])
def test_normalisation(raw, expected):
    assert normalize(raw).path == expected


@pytest.mark.parametrize("raw", ["/etc/passwd", "../x", "a/../../x", "", "   "])
def test_paths_outside_the_root_are_refused(raw):
    with pytest.raises(PathError):
        normalize(raw)


def test_symlink_leading_outside_is_refused(tmp_path):
    (tmp_path / "proj").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "proj" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(PathError, match="symlink"):
        normalize("link/file.py", str(tmp_path / "proj"))


def test_existing_directory_counts_as_directory(tmp_path):
    (tmp_path / "pkg").mkdir()
    assert normalize("pkg", str(tmp_path)).is_dir
    assert overlaps(normalize("pkg", str(tmp_path)), normalize("pkg/mod.py"))


@pytest.mark.parametrize("a,b,expected", [
    ("a.py", "a.py", True),
    ("a.py", "./a.py", True),
    ("a.py", "b.py", False),
    ("docs/", "docs/x/y.md", True),
    ("docs/", "docsx/y.md", False),
    ("tests/**/*.py", "tests/unit/test_a.py", True),
    ("tests/**/*.py", "tests/test_a.py", True),
    ("tests/**/*.py", "src/a.py", False),
    ("tests/**/*.py", "tests/data.json", False),
    ("*.md", "docs/", False),
    ("**/*.md", "docs/", True),
    ("src/*.py", "src/*_test.py", True),
    ("src/a*.py", "src/b*.py", False),
    ("src/[ab].py", "src/c.py", True),  # classes are treated as any character: conservative
    ("./", "anything/at/all", True),
])
def test_overlap_cases(a, b, expected):
    assert overlaps(t(a), t(b)) is expected
    assert overlaps(t(b), t(a)) is expected


segment = st.text(alphabet="ab.", min_size=1, max_size=3).filter(lambda s: s not in (".", ".."))
pattern_segment = st.text(alphabet="ab.*?", min_size=1, max_size=4).filter(lambda s: s not in (".", "..", "**"))
concrete = st.lists(segment, min_size=1, max_size=4).map("/".join)
pattern = st.lists(st.one_of(pattern_segment, st.just("**")), min_size=1, max_size=4).map("/".join)


def glob_matches(pat: str, path: str) -> bool:
    """Reference matcher: `**` spans segments, `*` and `?` stay within one (pathlib semantics)."""
    def rec(ps, xs):
        if not ps:
            return not xs
        if ps[0] == "**":
            return any(rec(ps[1:], xs[i:]) for i in range(len(xs) + 1))
        return bool(xs) and fnmatch.fnmatchcase(xs[0], ps[0]) and rec(ps[1:], xs[1:])
    return rec(pat.split("/"), path.split("/"))


@settings(max_examples=400, deadline=None)
@given(pattern, pattern)
def test_overlap_is_symmetric(a, b):
    assert overlaps(t(a), t(b)) == overlaps(t(b), t(a))


@settings(max_examples=400, deadline=None)
@given(pattern, pattern, concrete)
def test_a_path_matching_both_globs_means_overlap(a, b, path):
    if glob_matches(posixpath.normpath(a), path) and glob_matches(posixpath.normpath(b), path):
        assert overlaps(t(a), t(b))


@settings(max_examples=400, deadline=None)
@given(pattern, concrete)
def test_glob_against_file_agrees_with_fnmatch(pat, path):
    assert overlaps(t(pat), t(path)) == glob_matches(posixpath.normpath(pat), path)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab*?", max_size=5), st.text(alphabet="ab", max_size=5))
def test_segment_overlap_with_literal_is_fnmatch(p, s):
    if p and s:
        assert segment_overlap(p, s) == fnmatch.fnmatchcase(s, p)


@settings(max_examples=200, deadline=None)
@given(concrete)
def test_normalisation_is_idempotent(path):
    once = normalize(path).path
    assert normalize(once).path == once
    assert normalize("./" + path).path == once
