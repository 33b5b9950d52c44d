"""The ``pagefusion`` command. Each subcommand parses its arguments and
delegates; errors print as one line and exit non-zero."""

from __future__ import annotations

import argparse
import json
import logging
import sys

import libvirt

from pagefusion import __version__, connection, metrics, settings
from pagefusion.element import PageFusion, check_group
from pagefusion.errors import PagefusionError

log = logging.getLogger(__name__)


def _mib(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB"


def print_metrics(figures: metrics.HostMetrics) -> None:
    rows = [("domain", "page fusion", "group", metrics.GUEST_SHARED)]
    for d in figures.domains:
        rows.append((d.name, d.page_fusion, d.group or "-", _mib(d.shared_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(f"host {metrics.HOST_SHARED}: {_mib(figures.shared_bytes)}")


def cmd_install(args: argparse.Namespace) -> int:
    from pagefusion.install import install

    report = install(
        uri=args.connect, restart_libvirtd=args.restart_libvirtd, start_daemon=args.start_daemon
    )
    for name in report.isolated:
        print(f"domain {name!r}: page fusion off, merging turned off in its definition")
    for name in report.mergeable_until_restart:
        print(f"domain {name!r} is running and stays mergeable until it is restarted")
    print("pagefusion installed")
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
    print_metrics(figures)
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
        self.exit(2, f"pagefusion: {message} (see '{self.prog} --help')\n")


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
