"""The command line of the Python client (`waft-py`, or `python3 -m waft_client`).

    waft-py --endpoint 127.0.0.1:7001 status
    waft-py --endpoint 127.0.0.1:7001 deploy kv kv.wasm
    waft-py --endpoint 127.0.0.1:7001 submit kv 'put a 1'
    waft-py --endpoint 127.0.0.1:7001 query kv 'get a'
    waft-py --to-leader submit-lines kv commands.txt
    waft-py watch kv --from 1 --count 10

Secured clusters: `--tls-ca FILE` (or WAFT_TLS_CA) connects over TLS trusting that CA, and
`--token` (or WAFT_TOKEN) sends `authorization: Bearer TOKEN` with every call, like the waft CLI.
"""

import argparse
import os
import sys

from .client import Client
from .errors import WaftError


def _text(value):
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="waft-py", description="A Python client for waft")
    parser.add_argument("--endpoint", default=os.environ.get("WAFT_ENDPOINT", "127.0.0.1:7001"))
    parser.add_argument("--to-leader", action="store_true", help="talk to the leader directly")
    parser.add_argument("--tls-ca", default=os.environ.get("WAFT_TLS_CA"), help="connect over TLS, trusting this CA")
    parser.add_argument("--token", default=os.environ.get("WAFT_TOKEN"), help="bearer token sent with every call")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit")
    s.add_argument("service")
    s.add_argument("payload")
    sl = sub.add_parser("submit-lines", help="one command per line of FILE (- for stdin)")
    sl.add_argument("service")
    sl.add_argument("file")
    sl.add_argument("--batch", type=int, default=256, help="commands per request")
    q = sub.add_parser("query")
    q.add_argument("service")
    q.add_argument("payload")
    q.add_argument("--consistency", default="LINEARIZABLE", choices=["LINEARIZABLE", "LEASE", "STALE"])
    d = sub.add_parser("deploy")
    d.add_argument("service")
    d.add_argument("file")
    sub.add_parser("status")
    w = sub.add_parser("watch", help="print what the node applies, one line per event")
    w.add_argument("service", nargs="?", default="")
    w.add_argument("--from", dest="start", type=int, default=0, help="first log index (default: from now)")
    w.add_argument("--count", type=int, default=0, help="stop after this many events")
    args = parser.parse_args(argv)

    try:
        client = Client(args.endpoint, follow_leader=args.to_leader, tls_ca=args.tls_ca, token=args.token)
        if args.command == "submit-lines":
            f = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")
            with f:
                lines = [l.rstrip(b"\r\n") for l in f if l.strip()]
            failed = 0
            for r in client.submit_many(args.service, lines, batch=args.batch):
                if isinstance(r, WaftError):
                    failed += 1
                    print(f"error: {r.message}")
                elif r.ok:
                    print(_text(r.value))
                else:
                    failed += 1
                    print(f"{r.outcome}: {_text(r.value)} (index {r.index})")
            return 2 if failed else 0
        if args.command == "watch":
            seen = 0
            for e in client.watch(args.service, args.start):
                print(f"{e.index}\t{e.service}\t{e.payload.decode(errors='replace')}\t{e.outcome}: {_text(e.value)}", flush=True)
                seen += 1
                if args.count and seen >= args.count:
                    break
            return 0
        if args.command == "deploy":
            with open(args.file, "rb") as f:
                print(f"deployed {args.service} version {client.deploy(args.service, f.read()).version}")
            return 0
        if args.command == "status":
            s = client.status()
            print(f"node {s.node_id} is {s.role} in term {s.term}; leader {s.leader_id}; applied {s.applied_index}")
            return 0
        if args.command == "submit":
            r = client.submit(args.service, args.payload.encode())
        else:
            r = client.query(args.service, args.payload.encode(), args.consistency)
    except WaftError as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    if r.ok:
        print(_text(r.value))
        return 0
    print(f"{r.outcome}: {_text(r.value)} (index {getattr(r, 'index', getattr(r, 'applied_index', 0))})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
