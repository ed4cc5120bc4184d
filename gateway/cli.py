"""`aigw`: serve the gateway, run the demo, and check operator-edited files.

aigw serve                      run the gateway (settings from AIGW_* variables)
aigw demo [--port 8080]         a real Triton with two demo models, and the gateway
aigw worker [--model M]         answer prediction requests from Redis streams
aigw policy validate [DIR]      check policies (with contracts and fallbacks)
aigw contracts check [DIR]      check every OpenAPI document in contracts/
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import httpx
import orjson
from pydantic import ValidationError

from gateway.audit import WORKER_DIR_PREFIX, log_directories, verify
from gateway.auth import PERMISSIONS, KeysFileError, add_key, list_keys, revoke_key
from gateway.contracts import check_contracts, load_contracts
from gateway.logs import configure_logging
from gateway.policy import load_policies
from gateway.policy_store import read_bundle
from gateway.problems import FaultsError
from gateway.routing import compile_routes
from gateway.rules import labels_of, load_fallbacks
from gateway.settings import Settings
from gateway.simulation import simulate

DEMO_KEY = "demo-key"
DEMO_CURL = (
    "curl -s localhost:{port}/v1/predictions -H 'Authorization: Bearer demo-key' "
    "-H 'Content-Type: application/json' "
    """-d '{{"model_id":"customer-churn","features":{{"customer_id":"12345","""
    """"tenure_months":24,"monthly_charges":89.99}}}}'"""
)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.handler in _CHECKING_COMMANDS:
        return _without_traceback(args)
    return args.handler(args)


def _without_traceback(args: argparse.Namespace) -> int:
    """Run a command that reads operator files. Their faults are reported by the command;
    whatever else goes wrong is still one line and exit 1, never a traceback to read."""
    try:
        return args.handler(args)
    except Exception as error:
        print(f"aigw: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aigw", description="Resilient AI gateway")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--host", help="bind address (default: AIGW_HOST or 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: AIGW_PORT or 8080)")
    serve.add_argument(
        "--workers", type=int,
        help="worker processes sharing the port (default: AIGW_WORKERS or 1)",
    )  # fmt: skip
    serve.set_defaults(handler=_serve)

    demo = commands.add_parser("demo", help="run a real Triton with demo models and the gateway")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default 8080)")
    demo.add_argument("--triton-http-port", type=int, help="Triton HTTP port (default: free)")
    demo.set_defaults(handler=_demo)

    worker = commands.add_parser("worker", help="answer prediction requests from Redis streams")
    worker.add_argument(
        "--model", action="append", metavar="MODEL_ID",
        help="logical model to serve, repeatable (default: every model with a policy)",
    )  # fmt: skip
    worker.add_argument(
        "--concurrency", type=int, help="jobs at once per model (default: AIGW_WORKER_CONCURRENCY)"
    )
    worker.add_argument("--consumer", help="name in the consumer group (default: HOSTNAME-PID)")
    worker.add_argument("--metrics-port", type=int, help="serve /metrics on HOST:PORT")
    worker.add_argument(
        "--metrics-host", default="127.0.0.1",
        help="address for /metrics (default 127.0.0.1; 0.0.0.0 where Prometheus scrapes a pod)",
    )  # fmt: skip
    worker.set_defaults(handler=_worker)

    policy = commands.add_parser("policy", help="policy files").add_subparsers(
        required=True, metavar="ACTION"
    )
    validate = policy.add_parser("validate", help="check policies/, contracts/ and fallbacks/")
    validate.add_argument("directory", nargs="?", type=Path, help="policies directory")
    validate.set_defaults(handler=_policy_validate)

    for name, handler, help_text in (
        ("diff", _policy_diff, "diff local files against the running gateway's policies"),
        ("apply", _policy_apply, "apply local files to the running gateway as a new version"),
        ("history", _policy_history, "list the versions the running gateway has applied"),
        ("rollback", _policy_rollback, "apply an earlier version again"),
    ):
        action = policy.add_parser(name, help=help_text)
        action.add_argument("--admin-url", default=None, help="default http://ADMIN_HOST:PORT")
        action.add_argument(
            "--api-key-env", default="AIGW_API_KEY",
            help="environment variable holding an admin API key (default AIGW_API_KEY)",
        )  # fmt: skip
        if name in ("diff", "apply"):
            action.add_argument("--policies", type=Path, help="policies directory")
            action.add_argument("--fallbacks", type=Path, help="fallbacks directory")
        if name in ("apply", "rollback"):
            action.add_argument("--author", required=True, help="who makes this change")
        if name == "rollback":
            action.add_argument("version", type=int, help="version number from history")
        action.set_defaults(handler=handler)

    simulate = policy.add_parser(
        "simulate", help="replay recorded inputs through a proposed policies directory"
    )
    simulate.add_argument("proposed", type=Path, help="the proposed policies directory")
    simulate.add_argument("--inputs", type=Path, required=True, help="JSONL requests or audit")
    simulate.set_defaults(handler=_policy_simulate)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(
        required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", help="make a key for a tenant; shown once")
    create.add_argument("--tenant", required=True)
    create.add_argument(
        "--permissions", default="predict",
        help=f"comma-separated, of: {', '.join(PERMISSIONS)} (default: predict)",
    )  # fmt: skip
    listing = keys.add_parser("list", help="list keys (ids, tenants, permissions)")
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    for action, handler in ((create, _keys_create), (listing, _keys_list), (revoke, _keys_revoke)):
        action.add_argument("--file", type=Path, help="keys file (default: AIGW_KEYS_FILE)")
        action.set_defaults(handler=handler)

    audit = commands.add_parser("audit", help="the audit trail").add_subparsers(
        required=True, metavar="ACTION"
    )
    verify_audit = audit.add_parser("verify", help="check the hash chain of an audit directory")
    verify_audit.add_argument("directory", type=Path, help="audit directory (AIGW_AUDIT_DIR)")
    verify_audit.add_argument(
        "--anchor", metavar="SEQ:HASH", type=_anchor,
        help="a head this log had (as verify printed it, kept elsewhere): the log must still "
        "hold that record with that hash (a log of one writer only: name a worker's directory)",
    )  # fmt: skip
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


def _keys_file(args: argparse.Namespace) -> Path | None:
    path = args.file or Settings().keys_file
    if path is None:
        print("no keys file: pass --file or set AIGW_KEYS_FILE", file=sys.stderr)
    return path


def _keys_create(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    permissions = [p.strip() for p in args.permissions.split(",") if p.strip()]
    unknown = [p for p in permissions if p not in PERMISSIONS]
    if path is None or unknown or not permissions:
        if unknown:
            print(f"--permissions: unknown: {', '.join(unknown)}", file=sys.stderr)
        return 2
    try:
        key_id, key = add_key(path, args.tenant, permissions)
    except (KeysFileError, ValueError) as error:
        print(error, file=sys.stderr)
        return 1
    print(f"created {key_id} for tenant {args.tenant} ({', '.join(permissions)})")
    print(f"key (shown once, store it now): {key}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    if path is None:
        return 2
    try:
        entries = list_keys(path)
    except KeysFileError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    for entry in entries:
        print(f"{entry.id}  {entry.tenant}  {','.join(entry.permissions)}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    path = _keys_file(args)
    if path is None:
        return 2
    if not revoke_key(path, args.key_id):
        print(f"{args.key_id}: no such key", file=sys.stderr)
        return 1
    print(f"revoked {args.key_id}")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the chain is intact; else print `file:line: what` for the first problem.

    With AIGW_AUDIT_CHECKPOINT_KEY set, rotation checkpoints' MACs are checked too.
    """
    settings = Settings()
    key = settings.audit_checkpoint_key
    if not args.directory.is_dir():
        print(f"{args.directory}: not a directory", file=sys.stderr)
        return 2
    checked = "hash chain and checkpoint MACs" if key else "hash chain (no checkpoint key given)"
    # With several workers each keeps its own chain in `worker-N/`: every chain must hold.
    directories = log_directories(args.directory) or [args.directory]
    if args.anchor is not None and directories != [args.directory]:
        print(f"--anchor: {args.directory} holds {len(directories)} logs; name one of them",
              file=sys.stderr)  # fmt: skip
        return 2
    for directory in directories:
        result = verify(
            directory, key.get_secret_value().encode() if key else None,
            rotate_bytes=settings.audit_rotate_bytes, anchor=args.anchor,
        )  # fmt: skip
        if not result.ok:
            print(f"{directory}: {result}", file=sys.stderr)
            return 1
        print(
            f"{directory}: {result.records} records, {checked} intact; "
            f"head {result.last_seq}:{result.last_hash}"
        )
    return 0


def _anchor(value: str) -> tuple[int, str]:
    """`SEQ:HASH` as verify prints a log's head."""
    seq, _, digest = value.partition(":")
    if not (seq.isascii() and seq.isdigit() and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise argparse.ArgumentTypeError("must be SEQ:HASH, a record number and 64 hex digits")
    return int(seq), digest


def _policy_validate(args: argparse.Namespace) -> int:
    settings = Settings()
    directory = args.directory or settings.policies_dir
    try:
        contracts = load_contracts(settings.contracts_dir)
        policies = load_policies(directory, contracts, os.environ)
        load_fallbacks(settings.fallbacks_dir, contracts, labels_of(policies))
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    print(f"{directory}: {len(policies.policies)} policies valid (version {policies.version_hash})")
    return 0


def _admin_url(args: argparse.Namespace) -> str:
    settings = Settings()
    return args.admin_url or f"http://{settings.admin_host}:{settings.admin_port}"


def _local_bundle(args: argparse.Namespace) -> dict | None:
    """The local files as a bundle, or None once the files that cannot be read are printed."""
    settings = Settings()
    try:
        bundle = read_bundle(
            args.policies or settings.policies_dir, args.fallbacks or settings.fallbacks_dir
        )
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return None
    return bundle.to_dict()


def _call_admin(args: argparse.Namespace, method: str, path: str, body: dict | None = None):  # type: ignore[no-untyped-def]
    """One admin API call; prints the problem and returns None when it fails."""
    key = os.environ.get(args.api_key_env, "")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.request(
            method, _admin_url(args) + path, json=body, headers=headers, timeout=30
        )
    except httpx.HTTPError as error:
        print(f"{_admin_url(args)}: cannot reach the admin API: {error}", file=sys.stderr)
        return None
    if response.status_code >= 400:
        problem = response.json() if "json" in response.headers.get("content-type", "") else {}
        print(problem.get("detail") or problem.get("title") or response.text, file=sys.stderr)
        for error in problem.get("errors", []):
            print(error.get("detail", error), file=sys.stderr)
        return None
    return response.json()


def _policy_diff(args: argparse.Namespace) -> int:
    bundle = _local_bundle(args)
    if bundle is None:
        return 1
    result = _call_admin(args, "POST", "/admin/policies/diff", {"bundle": bundle})
    if result is None:
        return 1
    print(result["diff"] or "no differences", end="" if result["diff"] else "\n")
    for change in result.get("arm_models_changed") or []:
        print(
            f"{change['model_id']}/{change['arm']}: {change['from']} -> {change['to']}: "
            "its experiment statistics start afresh (the earlier model's are kept apart)"
        )
    return 0


def _policy_apply(args: argparse.Namespace) -> int:
    bundle = _local_bundle(args)
    if bundle is None:
        return 1
    result = _call_admin(args, "POST", "/admin/policies", {"author": args.author, "bundle": bundle})
    if result is None:
        return 1
    print(f"applied version {result['version']} ({result['content_hash'][:12]})")
    return 0


def _policy_history(args: argparse.Namespace) -> int:
    result = _call_admin(args, "GET", "/admin/policies/history")
    if result is None:
        return 1
    for v in result:
        print(f"{v['version']:>4}  {v['applied_at']}  {v['content_hash'][:12]}  "
              f"{v['source']:<12} {v['author']}")  # fmt: skip
    return 0


def _policy_rollback(args: argparse.Namespace) -> int:
    body = {"author": args.author, "version": args.version}
    result = _call_admin(args, "POST", "/admin/policies/rollback", body)
    if result is None:
        return 1
    print(f"version {args.version} applied again as version {result['version']}")
    return 0


def _policy_simulate(args: argparse.Namespace) -> int:
    """Route recorded inputs by the running files and by the proposed ones; print changes."""
    settings = Settings()
    try:
        contracts = load_contracts(settings.contracts_dir)
        running = load_policies(settings.policies_dir, contracts, os.environ)
        proposed = load_policies(args.proposed, contracts, os.environ)
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    try:
        inputs = _json_objects(args.inputs)
    except (OSError, ValueError) as error:
        print(f"{args.inputs}: cannot be read as JSON lines: {error}", file=sys.stderr)
        return 1

    def tables(policies):  # type: ignore[no-untyped-def]
        return {
            m: compile_routes(p, contracts.models[m].feature_types)
            for m, p in policies.policies.items()
        }

    report = simulate(tables(running), tables(proposed), inputs)
    print(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2).decode())
    return 0


def _json_objects(path: Path) -> list[dict]:
    """One JSON object per non-blank line; ValueError names the first line that is not one."""
    objects = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as error:
            raise ValueError(f"line {number}: {error}") from None
        if not isinstance(value, dict):
            raise ValueError(f"line {number}: a {type(value).__name__}, not a JSON object")
        objects.append(value)
    return objects


def _serve(args: argparse.Namespace) -> int:
    given = (("host", args.host), ("port", args.port), ("workers", args.workers))
    overrides = {k: v for k, v in given if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        for fault in error.errors():
            field = ".".join(str(part) for part in fault["loc"])
            print(f"setting {field} (--{field} or AIGW_{field.upper()}): {fault['msg']}",
                  file=sys.stderr)  # fmt: skip
        return 2
    return _run_gateway(settings, dict(os.environ))


def _run_gateway(settings: Settings, env: dict[str, str]) -> int:
    """Load and check every file first: a bad one stops start-up with its faults listed."""
    from gateway.app import create_admin_app, create_app
    from gateway.server import run_event_loop, serve_apps
    from gateway.supervisor import Supervisor

    configure_logging(settings.log_level)
    if settings.workers > 1:
        return Supervisor(settings, env).run()
    try:
        app = create_app(settings, env)
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    run_event_loop(serve_apps(app, create_admin_app(app), settings), settings)
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Start the demo Triton in its own process group, then the gateway in front of it."""
    from gateway.demo.triton_process import TritonProcess

    triton = TritonProcess(http_port=args.triton_http_port)
    stream_worker: subprocess.Popen | None = None
    print("starting Triton with the demo churn models (CPU)...", file=sys.stderr, flush=True)
    triton.start()
    try:
        env = {**os.environ, "AIGW_TRITON_URL": triton.http_url}
        keys_file = Path(tempfile.mkdtemp(prefix="aigw-demo-")) / "keys.yaml"
        add_key(keys_file, "demo", list(PERMISSIONS), key=DEMO_KEY)
        settings = Settings(port=args.port, keys_file=keys_file)
        if settings.redis_url:
            # Asynchronous predictions through Redis streams, answered by one stream worker.
            settings = settings.model_copy(update={"jobs_backend": "redis"})
            stream_worker = _start_demo_stream_worker(settings, env)
        print(f"Triton ready at {triton.http_url}; gateway on http://127.0.0.1:{args.port}")
        print(f"API key of the demo tenant (all permissions): {DEMO_KEY}")
        print("try:\n  " + DEMO_CURL.format(port=args.port), flush=True)
        return _run_gateway(settings, env)
    except KeyboardInterrupt:
        return 0
    finally:
        if stream_worker is not None:
            _stop_process(stream_worker)
        triton.stop()


def _start_demo_stream_worker(settings: Settings, env: dict[str, str]) -> subprocess.Popen:
    """`aigw worker` beside the demo gateway, auditing into its own chain (one writer each)."""
    audit_dir = settings.audit_dir / f"{WORKER_DIR_PREFIX}streams"
    print(f"stream worker on {settings.redis_url} (audit: {audit_dir})", flush=True)
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "worker"],
        env={**env, "AIGW_AUDIT_DIR": str(audit_dir)},
    )


def _stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _worker(args: argparse.Namespace) -> int:
    """Stream workers, with the files loaded and checked exactly as `aigw serve` does.

    The audit log has one writer per directory: give each worker its own AIGW_AUDIT_DIR.
    """
    from gateway.runtime import baselines_of, check_audit_log_free, load_configuration
    from gateway.server import run_event_loop
    from gateway.worker import default_consumer, serve_streams

    overrides = {"worker_concurrency": args.concurrency} if args.concurrency else {}
    try:
        settings = Settings(**overrides)
    except ValueError as error:
        print(f"aigw worker: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    if not settings.redis_url:
        print("aigw worker needs AIGW_REDIS_URL: the Redis holding the request streams",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        startup_bundle = read_bundle(settings.policies_dir, settings.fallbacks_dir)
        config = load_configuration(settings, os.environ)
        baselines = baselines_of(settings)  # a bad baseline stops start-up, as for `serve`
        check_audit_log_free(settings)
    except FaultsError as error:
        for fault in error.faults:
            print(fault, file=sys.stderr)
        return 1
    models = args.model or sorted(config.policies.policies)
    unknown = [m for m in models if m not in config.policies.policies]
    if unknown:
        print(f"--model: no policy for {', '.join(unknown)}", file=sys.stderr)
        return 2
    consumer = args.consumer or default_consumer()
    run_event_loop(
        serve_streams(
            settings,
            config,
            models,
            consumer,
            args.metrics_port,
            baselines,
            startup_bundle,
            args.metrics_host,
        ),
        settings,
    )
    return 0


_CHECKING_COMMANDS = (_policy_validate, _policy_diff, _policy_apply, _policy_simulate)


if __name__ == "__main__":
    sys.exit(main())
