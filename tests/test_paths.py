import fnmatch
import itertools
import posixpath

import pytest
from hypothesis import given, settings, strategies as st

from aipm.paths import PathError, Target, normalize, overlaps, segment_overlap


def t(raw: str) -> Target:
    return normalize(raw)


@pytest.mark.parametrize("raw,expected", [
    ("./a.py", "a.py"), ("src/../a.py", "a.py"), ("a//b.py", "a/b.py"), ("docs/", "docs"), (" x.py ", "x.py"),
    # A colon is a file name's character on POSIX: `a:b.txt` was refused as "absolute" (a Windows drive letter).
    ("a:b.txt", "a:b.txt"), ("C:/x.txt", "C:/x.txt"),
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


def test_a_glob_through_a_link_to_a_directory_whose_name_holds_glob_characters_matches_that_directory(tmp_path):
    """`w -> w[1]`: the target `w/*.py` became `w[1]/*.py`, whose `[1]` read as a class matched w1/a.py (another
    task's file, locked and allowed to it) and not w[1]/a.py, the files the link reaches."""
    (tmp_path / "w[1]").mkdir()
    (tmp_path / "w").symlink_to("w[1]")
    through = normalize("w/*.py", str(tmp_path))
    assert overlaps(through, Target("w[1]/a.py", False, False))
    assert not overlaps(through, Target("w1/a.py", False, False))
    assert normalize("w/a.py", str(tmp_path)) == Target("w[1]/a.py", False, False)  # a literal stays literal


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
    ("src/[ab].py", "src/c.py", False),  # a class matches its members only (it was read as any character)
    ("src/[ab].py", "src/b.py", True),
    ("src/[!a].py", "src/a.py", False),
    ("src/[a-c].py", "src/[!b-d].py", True),  # a
    ("src/[a-b].py", "src/[!a-c].py", False),
    ("src/[]x].py", "src/].py", True),  # `]` first in a class is a member, as fnmatch reads it
    ("src/[ab", "src/[ab", True),  # a `[` never closed is a literal character
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


class_token = st.sampled_from(["a", "b", "?", "[ab]", "[!a]", "[a-b]", "[]a]", "[!]]", "[b-a]", "[!ab]"])


@settings(max_examples=400, deadline=None)
@given(st.lists(class_token, min_size=1, max_size=3).map("".join),
       st.lists(class_token, min_size=1, max_size=3).map("".join))
def test_segment_overlap_of_classes_is_exact(p, q):
    """Some name fnmatch matches with both patterns exactly when segment_overlap says they overlap (every such
    name is within these lengths and characters: `x` stands for any character neither pattern names)."""
    names = ("".join(chars) for n in (1, 2, 3) for chars in itertools.product("ab]x", repeat=n))
    both = any(fnmatch.fnmatchcase(name, p) and fnmatch.fnmatchcase(name, q) for name in names)
    assert segment_overlap(p, q) is both


@settings(max_examples=200, deadline=None)
@given(concrete)
def test_normalisation_is_idempotent(path):
    once = normalize(path).path
    assert normalize(once).path == once
    assert normalize("./" + path).path == once


def _steps(compare) -> int:
    """The lines of aipm.paths that `compare()` runs: the work it does, counted, not timed."""
    import sys

    import aipm.paths

    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if frame.f_code.co_filename != aipm.paths.__file__:
            return None
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        compare()
    finally:
        sys.settrace(None)
    return count


def test_names_without_stars_are_compared_a_character_at_a_time_not_by_a_whole_table():
    """Two literal names (a glob target's directory against another's: `src/NAME_i/**/*.py`) were compared by the
    table that replaced the recursion (69b3ed9), filled whole: n x m steps where the recursion stopped at the first
    character that differs. 200 such targets took 2.5 times as long to plan; 300-character names, 90,000 cells."""
    import aipm.paths

    aipm.paths.segment_overlap.cache_clear()
    aipm.paths._segments_overlap.cache_clear()
    long_a, long_b = "n" * 299 + "a", "n" * 299 + "b"
    assert _steps(lambda: segment_overlap(long_a, long_b)) < 5_000
    assert _steps(lambda: overlaps(normalize(f"src/{long_a}/x/*.py"), normalize(f"src/{long_b}/x/*.py"))) < 5_000
    assert _steps(lambda: overlaps(normalize("/".join(["d"] * 300) + "/*.py"),
                                   normalize("/".join(["d"] * 299 + ["e"]) + "/*.py"))) < 20_000
    # the same answers as the table's
    assert segment_overlap(long_a, long_a) and not segment_overlap(long_a, long_b)
    assert segment_overlap(long_a, "n" * 299 + "?") and not segment_overlap(long_a, long_a + "n")
    assert overlaps(normalize(f"src/{long_a}/*.py"), normalize(f"src/{long_a}/x.py"))
    assert not overlaps(normalize("a/b/c/*.py"), normalize("a/b/*.py"))
    assert overlaps(normalize("a/**/c/*.py"), normalize("a/b/c/*.py"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="ab./*", min_size=1, max_size=12))
def test_normalisation_folds_a_path_as_normpath_does(raw):
    """Paths that need no folding skip normpath: whatever the path, the result is normpath's."""
    folded = posixpath.normpath(raw)
    if raw.startswith("/") or folded == ".." or folded.startswith("../"):
        with pytest.raises(PathError):
            normalize(raw)
        return
    target = normalize(raw)
    assert target.path == ("" if folded == "." else folded)
    assert target.is_dir == (raw.endswith("/") or folded == ".")


def test_one_load_sees_each_target_in_the_tree_as_a_lone_look_would(tmp_path):
    """A load shares what it found of each directory between targets: a missing directory (nothing below it is
    looked at), a file in a directory's place, a symlink one or two levels up. Every target comes out as it does
    alone, in any order."""
    from aipm.paths import Normaliser

    root = tmp_path / "proj"
    (root / "real" / "deep" / "sub").mkdir(parents=True)
    (root / "real" / "deep" / "f.py").write_text("")
    (root / "afile").write_text("")
    (root / "lnk").symlink_to(root / "real")
    (root / "real" / "inner").symlink_to(root / "real" / "deep")
    (root / "out").symlink_to(tmp_path)
    expected = {
        "missing/sub/x.py": Target("missing/sub/x.py", False, False),
        "missing/sub/": Target("missing/sub", True, False),
        "afile/x.py": Target("afile/x.py", False, False),
        "afile/x/y.py": Target("afile/x/y.py", False, False),
        "real/deep/sub": Target("real/deep/sub", True, False),
        "real/deep/f.py": Target("real/deep/f.py", False, False),
        "lnk/deep/f.py": Target("real/deep/f.py", False, False),
        "lnk/deep/sub": Target("real/deep/sub", True, False),
        "lnk/deep/new/x.py": Target("real/deep/new/x.py", False, False),
        "real/inner/f.py": Target("real/deep/f.py", False, False),
        "lnk/inner/sub": Target("real/deep/sub", True, False),
        "lnk/deep/**/*.py": Target("real/deep/**/*.py", False, True),
        "missing/**/*.py": Target("missing/**/*.py", False, True),
    }
    for raw, want in expected.items():
        assert normalize(raw, str(root)) == want, raw
    for order in (list(expected), list(reversed(expected)), sorted(expected, key=len)):
        together = Normaliser(root)
        assert {raw: together[raw] for raw in order} == expected
    together = Normaliser(root)
    together["real/deep/f.py"]
    with pytest.raises(PathError, match="symlink"):
        together["out/proj/../x.py"]
    with pytest.raises(PathError, match="symlink"):
        together["out/x/y.py"]


def test_a_root_of_slash_holds_every_path():
    """A project at `/` (a container's working directory with no git and no aipm.yaml): nothing was inside it, its
    prefix being `//`."""
    from aipm.paths import real_relative

    assert real_relative("/", "etc") == "etc" and real_relative("/", ".") == ""
    assert real_relative("/etc", "../usr") is None
