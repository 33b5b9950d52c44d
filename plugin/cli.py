"""The ``pagefusion`` command. Each subcommand parses its arguments and
delegates; errors print as one line and exit non-zero."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys

import libvirt

from pagefusion import __version__, connection, metricsview, settings
from pagefusion.element import PageFusion, check_group
from pagefusion.errors import PagefusionError, single_line

log = logging.getLogger(__name__)


def cmd_install(args: argparse.Namespace) -> int:
    from pagefusion.install import install

    report = install(
        uri=args.connect, restart_libvirtd=args.restart_libvirtd, start_daemon=args.start_daemon
    )
    if args.json:
        print(json.dumps(dataclasses.asdict(report), indent=2, sort_keys=True))
        return 0
    for name in report.isolated:
        print(f"domain {name!r}: page fusion off, merging turned off in its definition")
    for name in report.mergeable_until_restart:
        print(f"domain {name!r} is running and stays mergeable until it is restarted")
    print(f"pagefusion installed (hook {'written' if report.hook_changed else 'unchanged'})")
    return 0


def cmd_uninstall(args: argparse.Namespace) -> int:
    from pagefusion.install import uninstall

    restored = uninstall()
    print(f"pagefusion removed; KSM settings restored: {restored or 'none saved'}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    conn = connection.open_connection(args.connect)
    setting = settings.read(connection.lookup_domain(conn, args.domain))
    if args.json:
        print(json.dumps(setting.as_dict(), indent=2))
        return 0
    print(f"domain:        {setting.name}")
    print(f"state:         {setting.state}")
    print(f"page fusion:   {setting.persistent.describe()}")
    if setting.running_with is not None:
        print(f"running with:  {setting.running_with.describe()}")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    conn = connection.open_connection(args.connect)
    dom = connection.lookup_domain(conn, args.domain)
    value = PageFusion(enabled=args.state == "on", group=args.group)
    changed = settings.change(dom, value)
    verb = "set to" if changed else "already"
    print(f"domain {args.domain!r}: page fusion {verb} {value.describe()}")
    return 0


def cmd_metrics_list(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(metricsview.catalogue_json(), indent=2))
    else:
        print(metricsview.render_catalogue())
    return 0


def cmd_metrics_query(args: argparse.Namespace) -> int:
    metricsview.query(args.domains, as_json=args.json, samples=args.samples, period_s=args.period)
    return 0


def _positive_number(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
        return value

    return parse


def cmd_status(args: argparse.Namespace) -> int:
    from pagefusion import status

    report = status.collect()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(status.render(report))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from pagefusion.doctor import run_checks

    checks = run_checks(args.connect)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        for check in checks:
            print(f"{'ok  ' if check.ok else 'FAIL'}  {check.name:<10} {check.detail}")
    return 0 if all(c.ok for c in checks) else 1


def cmd_daemon(args: argparse.Namespace) -> int:
    from pagefusion.daemon import Daemon

    logging.getLogger("pagefusion").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    Daemon(args.connect).run()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pagefusion import demo

    if args.remove:
        for name in demo.remove_demo(args.connect):
            print(f"removed {name}")
        return 0
    figures = demo.run(progress=print, uri=args.connect)
    print()
    print(metricsview.render(figures))
    print("\nremove the demo guests with: pagefusion demo --remove")
    return 0


def _group(text: str) -> str:
    try:
        return check_group(text)
    except PagefusionError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, like every other error."""

    def error(self, message: str) -> None:
        self.exit(2, f"pagefusion: {single_line(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="pagefusion",
        description="VirtualBox-style Page Fusion for libvirt/QEMU domains, on the kernel's KSM.",
    )
    parser.add_argument("--version", action="version", version=f"pagefusion {__version__}")
    parser.add_argument("-c", "--connect", metavar="URI", help="libvirt URI (qemu:///system)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log decisions to stderr")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    install = commands.add_parser("install", help="install the hook and isolate other domains")
    install.add_argument(
        "--restart-libvirtd",
        action="store_true",
        help="restart libvirtd so that it sees the hook (running guests keep running)",
    )
    install.add_argument("--json", action="store_true", help="say what was done, in JSON")
    install.add_argument(
        "--start-daemon", action="store_true", help="start pagefusion's daemon if it is not running"
    )
    install.set_defaults(func=cmd_install)

    uninstall = commands.add_parser("uninstall", help="remove the hook, restore KSM settings")
    uninstall.set_defaults(func=cmd_uninstall)

    show = commands.add_parser("show", help="show a domain's page-fusion setting")
    show.add_argument("domain")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(func=cmd_show)

    set_ = commands.add_parser("set", help="turn page fusion on or off for a shut-off domain")
    set_.add_argument("domain")
    set_.add_argument("state", choices=("on", "off"))
    set_.add_argument("--group", type=_group, help="page-fusion group of the domain")
    set_.set_defaults(func=cmd_set)

    metrics_parser = commands.add_parser("metrics", help="fused-memory metrics (list, query)")
    metrics_commands = metrics_parser.add_subparsers(
        dest="metrics_command", required=True, metavar="ACTION"
    )
    metrics_list = metrics_commands.add_parser("list", help="every metric: unit, source")
    metrics_list.add_argument("--json", action="store_true", help="print JSON")
    metrics_list.set_defaults(func=cmd_metrics_list)
    metrics_query = metrics_commands.add_parser(
        "query", help="the figures of the host and its running domains"
    )
    metrics_query.add_argument("domains", nargs="*", metavar="DOMAIN")
    metrics_query.add_argument("--json", action="store_true", help="print JSON")
    metrics_query.add_argument(
        "--samples", type=_positive_number(int), default=1, help="how many readings"
    )
    metrics_query.add_argument(
        "--period", type=_positive_number(float), default=1.0, help="seconds between readings"
    )
    metrics_query.set_defaults(func=cmd_metrics_query)

    status = commands.add_parser(
        "status", help="KSM pacing, its reason, and each worker's findings"
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(func=cmd_status)

    doctor = commands.add_parser("doctor", help="check that this host is ready for page fusion")
    doctor.add_argument("--json", action="store_true", help="print JSON")
    doctor.set_defaults(func=cmd_doctor)

    daemon = commands.add_parser(
        "daemon", help="run the host daemon that enforces the shut-off rule (foreground)"
    )
    daemon.set_defaults(func=cmd_daemon)

    demo = commands.add_parser("demo", help="boot four small guests and show what fusion saves")
    demo.add_argument("--remove", action="store_true", help="remove the demo guests")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except PagefusionError as err:
        print(f"pagefusion: {err}", file=sys.stderr)
        return 1
    except libvirt.libvirtError as err:
        print(f"pagefusion: libvirt: {err.get_error_message()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
