"""docs/OPERATIONS.md keeps its promise that the suite runs every shell block it can: each
block is marked as run (by name) or not run (with a reason), and each name is run by a test."""

from __future__ import annotations

from collections import Counter

from .. import opsdoc

RUNNERS = ("deploy/test_install.py", "deploy/test_etcd_ops.py")


def test_every_shell_block_is_marked_run_or_not_run() -> None:
    """No unmarked ```sh block, no name used twice."""
    found = opsdoc.blocks()
    assert found, "no shell blocks found"
    unmarked = [body for kind, _, body in found if not kind]
    assert unmarked == []
    names = Counter(label for kind, label, _ in found if kind == "test")
    assert [name for name, count in names.items() if count > 1] == []


def test_every_block_marked_run_is_run_by_a_test() -> None:
    """Each name appears, quoted, in the tests that run the guide's blocks."""
    sources = "".join((opsdoc.ROOT / "tests" / name).read_text() for name in RUNNERS)
    names = [label for kind, label, _ in opsdoc.blocks() if kind == "test"]
    assert [name for name in names if f'"{name}"' not in sources] == []


def test_blocks_are_read_with_their_marks() -> None:
    """The parser takes the mark on the line before the fence, and only ```sh blocks."""
    text = ("<!-- test: one -->\n```sh\necho 1\n```\n\n```toml\nx = 1\n```\n"
            "<!-- not run: needs systemd -->\n```sh\nsystemctl start x\n```\n```sh\nls\n```\n")
    assert opsdoc.blocks(text) == [("test", "one", "echo 1\n"),
                                   ("not run", "needs systemd", "systemctl start x\n"),
                                   ("", "", "ls\n")]
