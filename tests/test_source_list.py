"""csrc/sources.txt is the one list of translation units (setup.py and CMake both read it): every
compiled source under csrc/ is in it, exactly once, in a known group, and every entry exists."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
GROUPS = {"core", "cpu_kernel", "cuda", "cuda_sm90", "python"}


def read_entries():
    entries = []
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            assert len(fields) == 2, f"not `<group> <path>`: {line!r}"
            entries.append(tuple(fields))
    return entries


def test_every_source_is_listed_once_in_a_known_group():
    entries = read_entries()
    paths = [path for _, path in entries]
    assert len(paths) == len(set(paths)), "a source is listed twice"
    assert {group for group, _ in entries} <= GROUPS
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in (".cpp", ".cu")}
    assert set(paths) == on_disk, f"missing: {sorted(on_disk - set(paths))}, stale: {sorted(set(paths) - on_disk)}"


def test_build_files_keep_no_source_list_of_their_own():
    # setup.py reads the list through scripts/build_config.py (which the aarch64 check reads too).
    for build_file in ("setup.py", "scripts/build_config.py", "CMakeLists.txt"):
        text = (ROOT / build_file).read_text()
        assert not re.search(r"csrc/[\w/]+\.(cpp|cu)\b", text), f"{build_file} names a source itself"
        assert "glob" not in text, f"{build_file} globs sources instead of reading csrc/sources.txt"
    assert "sources.txt" in (ROOT / "scripts" / "build_config.py").read_text()
    assert "sources.txt" in (ROOT / "CMakeLists.txt").read_text()
    assert "read_source_list()" in (ROOT / "setup.py").read_text()
