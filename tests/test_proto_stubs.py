"""The committed gRPC stubs match what the generator makes from proto/ today."""

from __future__ import annotations

from pathlib import Path

from sidecar.tools import genproto


def test_generated_stubs_are_current(tmp_path: Path) -> None:
    """Regenerating the stubs changes nothing; if this fails, run
    `python -m sidecar.tools.genproto` and commit the result."""
    fresh = {p.name: p.read_text() for p in genproto.generate(tmp_path)}
    committed = {p.name: p.read_text() for p in genproto.OUT_DIR.glob("*_pb2*")}
    assert sorted(fresh) == sorted(committed)
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert stale == [], f"stale generated files: {stale}"


def test_stubs_say_they_are_generated() -> None:
    """Every generated file starts by saying so and how to regenerate it."""
    for path in Path(genproto.OUT_DIR).glob("*_pb2*"):
        assert path.read_text().startswith(genproto.HEADER), path
