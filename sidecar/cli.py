"""``vsm-sidecar``: run the sidecar, query it, and try it out on a local cluster."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import NoReturn, TypeAlias

from . import __version__, config, logs

# The exit codes of every command (the --help epilog and the README say the same).
EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2
EXIT_CODES = """\
exit codes:
  0  done (also when there was nothing to do, e.g. a switchover to the current primary)
  1  failed at run time: the request was well formed, but the sidecar or the cluster said no,
     nobody answered, or the sidecar stopped on an error
  2  usage or configuration error: a bad flag, setting, file or address; nothing was done
"""
# Changes (Switchover, session writes) are allowed on the sidecar's Unix socket.
CONTROL_ADDRESS = f"unix:{config.DEFAULT_GRPC_SOCKET}"


class _Parser(argparse.ArgumentParser):
    """Command-line mistakes get one line on stderr and exit code 2, as settings do: without
    the usage text argparse prints first, which would bury the line that says what is wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {config.printable(message)} "
                               f"(see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vsm-sidecar",
        description="etcd-backed leader election that makes the ThinLinc VSM server highly "
                    "available", epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_service_commands(commands)
    _add_operator_commands(commands)
    _add_thinlinc_commands(commands)
    return parser


# What add_subparsers() returns: argparse names it privately.
Commands: TypeAlias = "argparse._SubParsersAction[_Parser]"


def _add_service_commands(commands: Commands) -> None:
    """run, check-config, and the stand-in VSM server."""
    run = commands.add_parser("run", help="run the sidecar beside a VSM server")
    config.add_arguments(run)
    run.set_defaults(func=_cmd_run)

    check = commands.add_parser(
        "check-config", help="validate the settings (flags, environment, file) and print them "
                             "as a TOML file that --config takes back",
        description="Make every check run makes before it connects to etcd, then print the "
                    "effective settings as TOML. It does not bind the listen addresses or lock "
                    "data_dir, which a running sidecar holds.")
    check.add_argument("--settings-only", action="store_true",
                       help="check the settings alone, not this host (the resource IP's "
                            "interface and capabilities, data_dir): for a file meant for "
                            "another host")
    config.add_arguments(check)
    check.set_defaults(func=_cmd_check_config)

    standin = commands.add_parser(
        "vsm-standin", help="a stand-in VSM server that follows its sidecar (for demos and "
                            "tests, and as an example of the API)")
    standin.add_argument("--grpc", default=CONTROL_ADDRESS, metavar="ADDR",
                         help="its sidecar's gRPC socket, where session writes are allowed "
                              f"[{CONTROL_ADDRESS}]")
    standin.add_argument("--listen", default="127.0.0.1:9000", metavar="HOST:PORT",
                         help="where to serve while PRIMARY [127.0.0.1:9000]")
    standin.add_argument("--name", default=None, help="name it answers with [host name]")
    standin.set_defaults(func=_cmd_standin)


def _add_operator_commands(commands: Commands) -> None:
    """status, switchover, release and the demo."""
    status = commands.add_parser("status", help="print the role of a running sidecar")
    status.add_argument("--grpc", default="127.0.0.1:50051", metavar="ADDR",
                        help="the sidecar's gRPC address [127.0.0.1:50051]")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--all", action="store_true",
                        help="every member of the cluster as this sidecar sees it in etcd: "
                             "role, epoch, health, applied revision and lag, resource IP; "
                             "and whether the cluster is paused")
    status.add_argument("--etcd", action="store_true",
                        help="--all read from etcd directly, with this node's settings "
                             "(--config FILE, VSM_SIDECAR_* or the flags below): works with "
                             "no sidecar running, from any host that reaches etcd")
    status.add_argument("--timeout", type=float, default=3.0, help="seconds to wait [3]")
    _add_client_tls(status)
    config.add_arguments(status)
    status.set_defaults(func=_cmd_status)

    move = commands.add_parser("switchover", help="move the primary role (a planned handover)")
    move.add_argument("--to", metavar="NODE", default=None,
                      help="the node to hand over to (default: any healthy, caught-up standby)")
    move.add_argument("--grpc", default=CONTROL_ADDRESS, metavar="ADDR",
                      help="any sidecar's gRPC address where Switchover is allowed: its Unix "
                           f"socket, or its TLS port with a client certificate [{CONTROL_ADDRESS}]")
    _add_client_tls(move)
    move.set_defaults(func=_cmd_switchover)

    _add_maintenance_commands(commands)
    release = commands.add_parser(
        "release", help="after a sidecar died: remove this node's resource IPs and revoke its "
                        "lease so the standby takes over at once (exit 1 if one is running)",
        description="Run by systemd after any exit of the unit (ExecStopPost=). Takes the "
                    "data_dir lock for its whole length, so it never touches a live sidecar.")
    config.add_arguments(release)
    release.set_defaults(func=_cmd_release)
    demo = commands.add_parser("demo", help="run a local cluster and show a failover")
    demo.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                      help="stop after this long (default: run the scenes, then until Ctrl-C)")
    demo.add_argument("--ttl", type=int, default=2, help="lease TTL of the demo sidecars [2]")
    demo.set_defaults(func=_cmd_demo)


def _add_maintenance_commands(commands: Commands) -> None:
    """pause and resume: they write to etcd directly, so they work on any node, with the
    primary dead or no sidecar running at all."""
    pause = commands.add_parser(
        "pause", help="maintenance mode: nothing moves by itself (no takeover, failback or "
                      "health handover) until resume or --for ends; switchover still works")
    pause.add_argument("--for", dest="pause_for", metavar="DURATION", default=None,
                       help="end by itself after this long (etcd deletes the key): 90, 90s, "
                            "15m, 2h, 1h30m [until resume]")
    pause.add_argument("--reason", dest="pause_reason", default="", metavar="TEXT",
                       help="why, shown by status, GetRole and /health")
    config.add_arguments(pause)
    pause.set_defaults(func=_cmd_pause)
    resume = commands.add_parser("resume", help="end maintenance mode")
    config.add_arguments(resume)
    resume.set_defaults(func=_cmd_resume)


def _add_thinlinc_commands(commands: Commands) -> None:
    """check-host and restore-sessions-file (docs/THINLINC.md)."""
    check_host = commands.add_parser(
        "check-host", help="check that this host is ready for the chosen vsm_server_mode "
                           "(hiveconf, etcd, capabilities, folders); exit 1 on any FAIL")
    config.add_arguments(check_host)
    check_host.add_argument("--json", action="store_true", help="print JSON")
    check_host.set_defaults(func=_cmd_check_host)

    restore = commands.add_parser(
        "restore-sessions-file", help="write etcd's copy of the sessions file to PATH "
                                      "(catastrophic recovery; refuses while the local VSM "
                                      "server answers)")
    config.add_arguments(restore)
    restore.add_argument("--to", required=True, metavar="PATH", dest="restore_to",
                         help="where to write it, e.g. /var/lib/vsm/sessions")
    restore.add_argument("--force", action="store_true",
                         help="write even while the local VSM server answers its check")
    restore.set_defaults(func=_cmd_restore)


def _add_client_tls(parser: argparse.ArgumentParser) -> None:
    """TLS towards a sidecar whose API has grpc_tls_cert (and client certificates with
    grpc_client_ca); giving any of these turns TLS on."""
    parser.add_argument("--grpc-ca", metavar="FILE", help="CA that signed the sidecar's "
                        "certificate (turns TLS on)")
    parser.add_argument("--grpc-cert", metavar="FILE", help="client certificate (mTLS)")
    parser.add_argument("--grpc-key", metavar="FILE", help="client key (mTLS)")


def main(argv: Sequence[str] | None = None) -> int:
    logs.quiet_grpc_core()
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except config.ConfigError as exc:
        print(f"vsm-sidecar: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _cmd_run(args: argparse.Namespace) -> int:
    from . import service
    from .etcd.errors import EtcdError

    settings = config.load(vars(args))
    logs.configure(settings.log_format, settings.log_level)
    try:
        return asyncio.run(service.run(settings))
    except EtcdError as exc:  # only errors that retrying cannot mend get this far
        print(f"vsm-sidecar: error: etcd: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _cmd_release(args: argparse.Namespace) -> int:
    from .etcd.errors import EtcdError
    from .host import release

    settings = config.load(vars(args))
    logs.configure(settings.log_format, settings.log_level)
    try:
        done = asyncio.run(release.release(settings))
    except release.SidecarRunning as exc:
        print(f"vsm-sidecar: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (EtcdError, ValueError) as exc:
        print(f"vsm-sidecar: error: release: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        raise config.ConfigError("data_dir", f"cannot use {settings.data_dir}: "
                                             f"{exc.strerror or exc}") from None
    print(f"vsm-sidecar: {done.summary()}")
    return EXIT_DONE


def _cmd_check_config(args: argparse.Namespace) -> int:
    from .host import preflight

    settings = config.load(vars(args))
    if not args.settings_only:
        preflight.check_host(settings)
    sys.stdout.write("# vsm-sidecar check-config: settings are valid; the effective settings "
                     "follow\n" + config.to_toml(settings))
    return EXIT_DONE


def _cmd_standin(args: argparse.Namespace) -> int:
    from .lab import standin

    return standin.main(grpc_address=args.grpc, listen=args.listen, name=args.name)


def _quiet_grpc() -> None:
    """gRPC's core logs a failed TLS handshake on stderr itself (an "I..." line before ours):
    a client command says what went wrong in its own one line. Read when grpc is first
    imported, so call this before; a GRPC_VERBOSITY the user set wins."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")


def _cmd_status(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from . import client

    if args.etcd:
        return _status_from_etcd(args)
    try:
        status = client.get_role(args.grpc, timeout=args.timeout, ca=args.grpc_ca,
                                 cert=args.grpc_cert, key=args.grpc_key)
    except (OSError, ValueError) as exc:  # an unreadable or incomplete client certificate
        print(f"vsm-sidecar: error: TLS files: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except client.Unreachable as exc:
        print(f"vsm-sidecar: {config.printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    if args.all:
        cluster = client.cluster_view(status)
        print(json.dumps(cluster, indent=2, sort_keys=True) if args.json
              else client.format_cluster(cluster))
    elif args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(client.format_status(status))
    return EXIT_DONE


def _status_from_etcd(args: argparse.Namespace) -> int:
    from . import client, maintenance
    from .etcd.errors import EtcdError

    settings = config.load(vars(args))
    logs.configure("console", "error")
    try:
        status = asyncio.run(maintenance.cluster_status(settings))
    except EtcdError as exc:
        print(f"vsm-sidecar: error: etcd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    cluster = client.cluster_view(status)
    print(json.dumps(cluster, indent=2, sort_keys=True) if args.json
          else client.format_cluster(cluster))
    return EXIT_DONE


def _cmd_pause(args: argparse.Namespace) -> int:
    from . import maintenance

    seconds = maintenance.parse_duration(args.pause_for) if args.pause_for else None
    if args.pause_for and seconds is None:
        print(f"vsm-sidecar: error: --for: {config.printable(repr(args.pause_for))} is not a "
              "duration (e.g. 90, 90s, 15m, 2h, 1h30m)", file=sys.stderr)
        return EXIT_CONFIG
    if len(args.pause_reason) > maintenance.MAX_REASON:
        print(f"vsm-sidecar: error: --reason: at most {maintenance.MAX_REASON} characters",
              file=sys.stderr)
        return EXIT_CONFIG
    settings = config.load(vars(args))
    logs.configure("console", "error")
    return maintenance.run(maintenance.pause(settings, seconds, args.pause_reason))


def _cmd_resume(args: argparse.Namespace) -> int:
    from . import maintenance

    settings = config.load(vars(args))
    logs.configure("console", "error")
    return maintenance.run(maintenance.resume(settings))


def _cmd_switchover(args: argparse.Namespace) -> int:
    _quiet_grpc()
    from . import client

    if args.to is not None and not config.NAME_PATTERN.fullmatch(args.to):
        print(f"vsm-sidecar: error: --to: {config.printable(repr(args.to))} is not a node id",
              file=sys.stderr)
        return EXIT_CONFIG
    tls = {"ca": args.grpc_ca, "cert": args.grpc_cert, "key": args.grpc_key}
    try:
        # The answer is the same whether the role moved or the target held it already; the
        # epoch tells them apart, since every new leadership gets a new one.
        before = client.get_role(args.grpc, **tls) if args.to else {}
        primary, epoch, took = client.switchover(args.grpc, args.to, **tls)
    except (OSError, ValueError) as exc:
        print(f"vsm-sidecar: error: TLS files: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except client.Refused as exc:
        print(f"vsm-sidecar: switchover refused: {config.printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except client.Unreachable as exc:
        print(f"vsm-sidecar: {config.printable(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    if (before.get("leader_id"), before.get("epoch")) == (primary, str(epoch)):
        print(f"{primary} is already the primary (epoch {epoch}): nothing to move")
    else:
        print(f"{primary} is PRIMARY (epoch {epoch}), moved in {took * 1000:.0f} ms")
    return EXIT_DONE


def _cmd_check_host(args: argparse.Namespace) -> int:
    from .host import checkhost

    settings = config.load(vars(args))
    logs.configure("console", "error")
    checks = checkhost.run_checks(settings)
    print(checkhost.render(checks, args.json))
    return 1 if any(c.status == checkhost.FAIL for c in checks) else 0


def _cmd_restore(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .vsmfile import restore

    settings = config.load(vars(args))
    logs.configure("console", "error")
    return restore.restore(settings, Path(args.restore_to), force=args.force)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .lab import demo

    return demo.main(duration=args.duration, ttl=args.ttl)




if __name__ == "__main__":
    sys.exit(main())
