"""`aigw`: serve the gateway, run the demo, and check operator-edited files.

aigw serve                      run the gateway (settings from AIGW_* variables)
aigw demo [--port 8080]         a real Triton with two demo models, and the gateway
aigw policy validate [DIR]      check policies (with contracts and fallbacks)
aigw contracts check [DIR]      check every OpenAPI document in contracts/
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from gateway.audit import verify
from gateway.contracts import ContractError, check_contracts, load_contracts
from gateway.logs import configure_logging
from gateway.policy import PolicyError, load_policies
from gateway.rules import FallbackError, load_fallbacks
from gateway.settings import Settings

DEMO_CURL = (
    "curl -s localhost:{port}/v1/predictions -H 'Content-Type: application/json' "
    """-d '{{"model_id":"customer-churn","features":{{"customer_id":"12345","""
    """"tenure_months":24,"monthly_charges":89.99}}}}'"""
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigw", description="Resilient AI gateway")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="bind address (default: AIGW_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: AIGW_PORT or 8080)")
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo", help="run a real Triton with demo models and the gateway")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--triton-http-port", type=int, help="Triton HTTP port (default: free)")
    demo.set_defaults(handler=_demo)

    policy = commands.add_parser("policy", help="policy files").add_subparsers(
        required=True, metavar="ACTION"
    )
    validate = policy.add_parser("validate", help="check policies/, contracts/ and fallbacks/")
    validate.add_argument("directory", nargs="?", type=Path, help="policies directory")
    validate.set_defaults(handler=_policy_validate)

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        required=True, metavar="ACTION"
    )
    verify_audit = audit.add_parser("verify", help="check the hash chain of an audit directory")
    verify_audit.add_argument("directory", type=Path, help="audit directory (AIGW_AUDIT_DIR)")
    verify_audit.set_defaults(handler=_audit_verify)

    contracts = commands.add_parser("contracts", help="contract documents").add_subparsers(
        required=True, metavar="ACTION"
    )
    check = contracts.add_parser("check", help="check every OpenAPI document")
    check.add_argument("directory", nargs="?", type=Path, help="contracts directory")
    check.set_defaults(handler=_contracts_check)
    return parser


def _contracts_check(args: argparse.Namespace) -> int:
    directory = args.directory or Settings().contracts_dir
    faults = check_contracts(directory)
    for fault in faults:
        print(fault, file=sys.stderr)
    if not faults:
        print(f"{directory}: every contract is valid OpenAPI 3.1")
    return 1 if faults else 0


def _audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the chain is intact; else print `file:line: what` for the first problem.

    With AIGW_AUDIT_CHECKPOINT_KEY set, rotation checkpoints' MACs are checked too.
    """
    key = Settings().audit_checkpoint_key
    if not args.directory.is_dir():
        print(f"{args.directory}: not a directory", file=sys.stderr)
        return 2
    result = verify(args.directory, key.get_secret_value().encode() if key else None)
    if not result.ok:
        print(str(result), file=sys.stderr)
        return 1
    checked = "hash chain and checkpoint MACs" if key else "hash chain (no checkpoint key given)"
    print(f"{args.directory}: {result.records} records, {checked} intact")
    return 0


def _policy_validate(args: argparse.Namespace) -> int:
    settings = Settings()
    directory = args.directory or settings.policies_dir
    try:
        contracts = load_contracts(settings.contracts_dir)
        policies = load_policies(directory, contracts, os.environ)
        load_fallbacks(settings.fallbacks_dir, contracts)
    except (ContractError, PolicyError, FallbackError) as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    print(f"{directory}: {len(policies.policies)} policies valid (version {policies.version_hash})")
    return 0


def _serve(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    return _run_gateway(settings, dict(os.environ))


def _run_gateway(settings: Settings, env: dict[str, str]) -> int:
    """Load and check every file first: a bad one stops start-up with its faults listed."""
    from gateway.app import create_admin_app, create_app

    configure_logging(settings.log_level)
    try:
        app = create_app(settings, env)
    except (ContractError, PolicyError, FallbackError) as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    asyncio.run(_serve_both(app, create_admin_app(app), settings))
    return 0


class _AdminServer(uvicorn.Server):
    """The admin listener; the public server owns signal handling and stops it."""

    def capture_signals(self):  # type: ignore[no-untyped-def]
        return contextlib.nullcontext()


async def _serve_both(app, admin_app, settings: Settings) -> None:  # type: ignore[no-untyped-def]
    """The public API and, on its own address, the admin API, in one event loop."""
    public = uvicorn.Server(_server_config(app, settings.host, settings.port))
    admin = _AdminServer(_server_config(admin_app, settings.admin_host, settings.admin_port))
    admin.config.lifespan = "off"  # the public app's lifespan builds the shared runtime
    admin_task = asyncio.create_task(admin.serve())
    try:
        await public.serve()
    finally:
        admin.should_exit = True
        await admin_task


def _server_config(app, host: str, port: int) -> uvicorn.Config:  # type: ignore[no-untyped-def]
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=10,
        lifespan="on",
    )


def _demo(args: argparse.Namespace) -> int:
    """Start the demo Triton in its own process group, then the gateway in front of it."""
    from gateway.demo.triton_process import TritonProcess

    triton = TritonProcess(http_port=args.triton_http_port)
    print("starting Triton with the demo churn models (CPU)...", file=sys.stderr, flush=True)
    triton.start()
    try:
        env = {**os.environ, "AIGW_TRITON_URL": triton.http_url}
        settings = Settings(port=args.port)
        print(f"Triton ready at {triton.http_url}; gateway on http://127.0.0.1:{args.port}")
        print("try:\n  " + DEMO_CURL.format(port=args.port), flush=True)
        return _run_gateway(settings, env)
    except KeyboardInterrupt:
        return 0
    finally:
        triton.stop()


if __name__ == "__main__":
    sys.exit(main())
