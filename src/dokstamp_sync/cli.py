"""The ``dokstamp-sync`` command. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dokstamp_sync.config import ConfigError, load_settings
from dokstamp_sync.dokstamp.errors import DokStampError


def _sandbox(args: argparse.Namespace) -> int:
    from dokstamp_sync.sandbox import Account, Faults, SandboxConfig, serve

    account = Account(tenant=args.tenant, email=args.email, password=args.password,
                      client_id=args.client_id, client_secret=args.client_secret)
    faults = Faults(rate_limit=args.rate_limit, burst=args.burst, error_rate=args.error_rate,
                    lost_response_share=args.lost_response_share, latency_ms=args.latency_ms,
                    slow_rate=args.slow_rate, slow_seconds=args.slow_seconds, seed=args.seed)
    config = SandboxConfig(accounts=[account], token_ttl=args.token_ttl,
                           error_style=args.error_style, faults=faults)
    print(f"DokStamp sandbox on http://{args.host}:{args.port} (tenant {args.tenant!r}); "
          "Ctrl-C stops it", file=sys.stderr)
    serve(config, host=args.host, port=args.port)
    return 0


def _walkthrough(args: argparse.Namespace) -> int:
    from dokstamp_sync.dokstamp import client_from_settings
    from dokstamp_sync.sandbox import Account, SandboxServer
    from dokstamp_sync.walkthrough import walk

    if args.use_settings:
        client = client_from_settings(load_settings())
        with client.http:
            walk(client)
        return 0
    account = Account()
    with SandboxServer() as server:
        print(f"started an in-process DokStamp sandbox at {server.url}")
        settings = load_settings(dokstamp_api_url=server.url, dokstamp_tenant=account.tenant,
                                 dokstamp_email=account.email,
                                 dokstamp_password=account.password)
        client = client_from_settings(settings)
        with client.http:
            walk(client)
            print("second run (nothing new is created):")
            walk(client)
        stats = server.sandbox.stats.to_json()
        print(f"{stats['requests']} API calls: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(stats["by_route"].items())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dokstamp-sync", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sb = sub.add_parser("sandbox", help="run the local DokStamp sandbox API")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8400)
    sb.add_argument("--tenant", default="demo-university")
    sb.add_argument("--email", default="admin@demo-university.edu")
    sb.add_argument("--password", default="sandbox-password")
    sb.add_argument("--client-id", default="sandbox-client")
    sb.add_argument("--client-secret", default="sandbox-secret")
    sb.add_argument("--token-ttl", type=float, default=3600.0, help="access token lifetime, s")
    sb.add_argument("--error-style", choices=("v-a", "v-b"), default="v-a",
                    help="v-b adds success:false to error bodies (newer docs)")
    sb.add_argument("--rate-limit", type=float, default=None, help="requests/s per tenant")
    sb.add_argument("--burst", type=float, default=None, help="token bucket size")
    sb.add_argument("--error-rate", type=float, default=0.0, help="share answered 5xx")
    sb.add_argument("--lost-response-share", type=float, default=0.5,
                    help="share of the 5xx that happen after the write was applied")
    sb.add_argument("--latency-ms", type=float, default=0.0)
    sb.add_argument("--slow-rate", type=float, default=0.0, help="share of slow answers")
    sb.add_argument("--slow-seconds", type=float, default=0.0)
    sb.add_argument("--seed", type=int, default=None)
    sb.set_defaults(func=_sandbox)

    wt = sub.add_parser("walkthrough", help="sync one certificate through the whole graph")
    wt.add_argument("--use-settings", action="store_true",
                    help="talk to the API configured in the environment instead of an "
                         "in-process sandbox")
    wt.set_defaults(func=_walkthrough)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except DokStampError as exc:
        print(f"DokStamp error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
