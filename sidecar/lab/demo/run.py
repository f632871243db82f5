"""Start the demo, play its scenes under the live view, and clean up whatever happens."""

from __future__ import annotations

import sys
import time

from ...config import MAX_TTL, MIN_TTL
from ..etcderrors import EtcdClusterError
from ..localnode import LocalSidecar
from .intro import commands, intro, standins_line, vip_line
from .lab import Lab
from .plan import SceneFailed
from .scenes import SCENES, Scene
from .signals import Terminated, signals_ignored, sigterm_unwinds
from .standin_process import StandIn
from .view import LiveView, emit

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
LOG_TAIL_LINES = 15


def main(duration: float | None = None, ttl: int = 2) -> int:
    """Run the demo: 0 when every scene met its expectation, 1 if one did not, 130 on Ctrl-C
    (128 + the signal on SIGTERM or SIGHUP). Whatever happens, everything it started is gone
    when it returns."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        print(f"vsm-sidecar demo: --ttl must be {MIN_TTL}-{MAX_TTL}, not {ttl}", file=sys.stderr)
        return EXIT_USAGE
    started = time.monotonic()
    with sigterm_unwinds():
        lab = Lab(ttl)
        view = LiveView(lab, sys.stdout.isatty(), started)
        try:
            code = _attempt(lab, view, duration)
        finally:
            with signals_ignored():
                view.stop()
                _close(lab)
    return code


def _attempt(lab: Lab, view: LiveView, duration: float | None) -> int:
    try:
        _run(lab, view, duration)
        return EXIT_OK
    except KeyboardInterrupt as exc:
        view.stop()
        by = f" by {exc}" if isinstance(exc, Terminated) else ""
        emit(f"\nInterrupted{by}: stopping every process the demo started...")
        return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED
    # Also the harness's own errors: no etcd binary, a sidecar that never answered.
    except (SceneFailed, EtcdClusterError, RuntimeError, TimeoutError) as exc:
        view.stop()
        _report_failure(lab, view, exc)
        return EXIT_FAILED


def _run(lab: Lab, view: LiveView, duration: float | None) -> None:
    view.add_header(*intro(lab))
    view.say("Starting a 3-member etcd cluster...")
    if lab.net is not None:
        view.say("Building the network namespace lab (hosts a, b, client; a bridge)...")
    lab.start_etcd()
    view.add_header(vip_line(lab), *commands(lab))
    view.start()
    view.say(standins_line(lab.start_standins(), lab))
    for number, scene in enumerate(SCENES, start=1):
        _play(number, scene, lab, view)
    view.say(f"All {len(SCENES)} scenes went as expected.")
    _linger(view, duration)


def _play(number: int, scene: Scene, lab: Lab, view: LiveView) -> None:
    def announce(title: str) -> None:
        view.progress = f"scene {number}/{len(SCENES)}: {title}"
        view.say(f"Scene {number}/{len(SCENES)}: {title}...")

    result = scene(lab, announce)
    view.say(f"  => {result}")


def _linger(view: LiveView, duration: float | None) -> None:
    if duration is None:
        view.progress = "scenes done; the cluster keeps running: try the commands. Ctrl-C stops."
        while True:  # until Ctrl-C or SIGTERM raises out of the sleep
            time.sleep(3600)
    left = view.started + duration - time.monotonic()
    if left > 0:
        view.progress = f"scenes done; the demo ends {duration:g} s after its start"
        time.sleep(left)


def _report_failure(lab: Lab, view: LiveView, exc: BaseException) -> None:
    view.say(f"FAILED: {exc}")
    logs: list[LocalSidecar | StandIn] = [*lab.nodes, *lab.standins.values()]
    for proc in logs:
        if proc.process is not None:
            view.say(f"--- last lines of {proc.log_path} ---\n{proc.log_tail(LOG_TAIL_LINES)}")


def _close(lab: Lab) -> None:
    try:
        lab.close()
    except Exception as exc:  # say so, but the caller's exit code stays what it was
        emit(f"Cleanup problem: {exc}", file=sys.stderr)
        return
    namespaces = "" if lab.net is None else f" and the network namespaces {lab.net.tag}-*"
    emit(
        f"Stopped etcd, the sidecars and the stand-in VSM servers; removed {lab.workdir}"
        f"{namespaces}."
    )
