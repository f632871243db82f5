"""ThinLinc's hiveconf files, read as ThinLinc writes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.host import hiveconf

FIXTURES = Path(__file__).parent.parent / "fixtures" / "hiveconf"


def test_real_format_files_are_read_with_sections_comments_and_blank_values() -> None:
    """Sections, key=value lines (spaces around '=' or not), comments, blank values and
    directives are read the way ThinLinc reads them; a later file wins."""
    hive = hiveconf.read_dir(FIXTURES)
    assert [p.name for p in hive.files] == ["vsmagent.hconf", "vsmserver.hconf",
                                            "zz-local.hconf"]
    assert hive.get("/vsmserver/HA/enabled") == "1"
    assert hive.words("/vsmserver/HA/nodes") == ["tl-a.example.com", "tl-b.example.com"]
    assert hive.get("/vsmagent/master_hostname") == "tl.example.com"
    assert hive.get("/vsmserver/unbind_ports_at_login") == ""
    assert hive.get("/vsmserver/listen_port") == "9001"  # zz-local.hconf overrides
    assert hive.where("/vsmserver/listen_port").endswith("zz-local.hconf:4")
    assert hive.get("/vsmserver/admin_email") == "root@localhost"
    assert hive.get("/vsmserver/subclusters/Default/agents") == "127.0.0.1"
    assert hive.get("/vsmserver/HA/missing") is None
    assert hive.has_folder("/vsmagent")
    assert not hive.has_folder("/webaccess")
    assert not any("#" in path or "%" in path for path in hive.values)


@pytest.mark.parametrize(("text", "expected"), [
    ("1", True), ("true", True), ("Yes", True), ("on", True),
    ("0", False), ("false", False), ("no", False), ("off", False), ("", False),
])
def test_booleans_read_as_hiveconf_reads_them(text: str, expected: bool) -> None:
    """1/true/yes/on and 0/false/no/off (any case), and a blank value, are booleans."""
    hive = hiveconf.parse(f"[/vsmserver/HA]\nenabled={text}\n")
    assert hive.boolean("/vsmserver/HA/enabled") is expected


def test_a_value_that_is_no_boolean_says_where_it_is() -> None:
    """A boolean parameter set to anything else is an error naming the file and line."""
    hive = hiveconf.parse("[/vsmserver/HA]\n\nenabled=maybe\n", "ha.hconf")
    with pytest.raises(hiveconf.HiveconfError, match=r"ha.hconf:3"):
        hive.boolean("/vsmserver/HA/enabled")
    assert hive.boolean("/vsmserver/HA/other") is None


@pytest.mark.parametrize("line", ["just words", "=value", "a/b=1", "two words=1"])
def test_a_line_that_is_not_hiveconf_is_an_error_with_its_place(line: str) -> None:
    """A line that is neither a section, a parameter, a comment nor blank is refused, naming
    the file and the line number."""
    with pytest.raises(hiveconf.HiveconfError, match=r"^x.hconf:2: "):
        hiveconf.parse(f"[/vsmagent]\n{line}\n", "x.hconf")


def test_parameters_before_any_section_live_at_the_root() -> None:
    """A key=value before the first section is a root parameter; sections may be written
    with white space inside the brackets and a trailing slash."""
    hive = hiveconf.parse("top=1\n[ /vsmagent/ ]\nmaster_hostname=x\n")
    assert hive.get("/top") == "1"
    assert hive.get("/vsmagent/master_hostname") == "x"


def test_an_empty_or_missing_folder_reads_as_nothing(tmp_path: Path) -> None:
    """No *.hconf files, or no folder at all: an empty hive (check-host then FAILs)."""
    assert hiveconf.read_dir(tmp_path).files == []
    assert hiveconf.read_dir(tmp_path / "missing").values == {}
