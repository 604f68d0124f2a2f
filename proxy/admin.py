"""`sipproxy-admin`: the administrator's command line.

Later issues add the commands (users, registrations, forwarding, reboot);
today it prints its help and the version.
"""

import argparse
import sys

from proxy import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sipproxy-admin",
        description="Administer a sipproxy server: users, registrations, forwarding, phones.",
    )
    parser.add_argument("--version", action="version", version=f"sipproxy {__version__}")
    parser.add_argument("-c", "--config", help="the server's TOML configuration file")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
