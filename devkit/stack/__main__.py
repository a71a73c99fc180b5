"""``python -m devkit.stack``: the local stack's command line (``scripts/stack``)."""

from __future__ import annotations

import argparse

from devkit.stack import __doc__ as stack_doc
from devkit.stack.demo_run import DEMO_CONF, demo
from devkit.stack.local import LocalStack, say


def one_service(stack: LocalStack, verb: str, name: str, *, kill: bool) -> int:
    """``stop|start|restart NAME``."""
    if verb == "stop":
        stack.stop(name, kill=kill)
        say(f"{name} stopped")
        return 0
    pid = stack.start(name) if verb == "start" else stack.restart(name, kill=kill)
    say(f"{name} started again: pid {pid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(stack_doc or "").split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    d = commands.add_parser("demo", help="start the stack, run the DAG once, print the result")
    d.add_argument("--sample", type=int, default=200, help="rows of the CSV (default: 200)")
    d.add_argument(
        "--epochs",
        type=int,
        default=DEMO_CONF["epochs"],
        help="epochs of the retrain (the first run trains 1) (default: %(default)s)",
    )
    d.add_argument(
        "--retrain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a quick first model, then a retrain with --epochs, to show the promotion decision",
    )
    d.add_argument("--csv", default=None, help="CSV to sample (default: the CrowdFlower file)")
    d.add_argument("--topology", choices=("local", "celery"), default="local", help="see up")
    d.add_argument(
        "--timeout",
        type=float,
        default=1800,
        help="seconds to wait for each run; the run goes on after (default: %(default)s)",
    )
    d.add_argument(
        "--real",
        action="store_true",
        help="keep the CSV's own image URLs (a "
        "machine with internet); with --sample 0 it is the whole real dataset",
    )
    u = commands.add_parser("up", help="start the stack")
    u.add_argument(
        "--topology",
        choices=("local", "celery"),
        default="local",
        help="local: SQLite and LocalExecutor; celery: docker-compose.yaml's topology run "
        "natively (Postgres, Redis, CeleryExecutor, a default and a gpu worker)",
    )
    commands.add_parser("down", help="stop everything the stack started")
    for verb, text in (
        ("stop", "stop one service and all it started (SIGTERM, 30 s, SIGKILL)"),
        ("restart", "stop one service, then start it again"),
        ("start", "start a stopped service again"),
    ):
        one = commands.add_parser(verb, help=text)
        one.add_argument("service")
        if verb != "start":
            one.add_argument("--kill", action="store_true", help="SIGKILL at once (a crash)")
    commands.add_parser("status", help="show the stack's processes")
    v = commands.add_parser("serve", help="serve the stack's champion model over HTTP")
    v.add_argument("--port", type=int, default=5001)
    v.add_argument("--model", default=None, help="default: models:/image-sentiment@champion")
    args = parser.parse_args(argv)
    stack = LocalStack.from_environment()
    if args.command == "demo":
        return demo(stack, args)
    if args.command == "up":
        stack.up(args.topology)
        return 0
    if args.command == "down":
        return stack.down()
    if args.command == "serve":
        return stack.serve(args.port, args.model)
    if args.command in ("stop", "start", "restart"):
        return one_service(stack, args.command, args.service, kill=getattr(args, "kill", False))
    return stack.status()


if __name__ == "__main__":
    raise SystemExit(main())
