"""`tensorgate infer`: one inference from the command line, for quick manual calls.

    tensorgate infer add_sub --input INPUT0=x.npy --input 'INPUT1=[[1, 2, 3, 4]]' --server 127.0.0.1:8001

An input is NAME=FILE.npy (sent with the array's dtype), NAME=FILE.json or NAME=JSON (a nested list, cast to the
datatype the model's metadata declares for that input). Outputs print as one JSON object, or go to NAME.npy files
with --npy-out DIR. .npy has no bfloat16: a float file for a BF16 input is rounded to it, and BF16 outputs are
written as float32 (exactly). A failed call prints one line, "tensorgate infer: CODE: message", and exits 1.
JSON inputs take their datatypes from the model's metadata, which an authorization policy may not allow the
caller to read although it allows inference; .npy inputs carry their own and are sent without it.

A decoupled model (any number of responses per request) is called over ModelStreamInfer, which is the only way it
answers: each response prints as its own JSON line as it arrives (or goes to NAME.<i>.npy, i counting from 0), all
within --timeout; an error on the stream prints "tensorgate infer: UNKNOWN: message" (streams carry no status code).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tensorgate.client._common import InferResult, check_headers
from tensorgate.client.aio import AsyncInferenceClient
from tensorgate.client.config import DEFAULT_TIMEOUT_S, TLSConfig
from tensorgate.client.errors import PermissionDenied, StreamItemError, TensorgateClientError, Unimplemented
from tensorgate.client.sync import InferenceClient
from tensorgate.protos import model_config_pb2 as mc
from tensorgate.protos import tensors

PROG = "tensorgate infer"


class UsageError(Exception):
    """A bad argument: printed as one line, exit status 2."""


TRANSPORT_FAILURES = (
    "failed to connect",
    "socket closed",
    "connection reset",
    "connection refused",
    "broken pipe",
    "recvmsg",
    "sendmsg",
    "dns resolution failed",
    "endpoint closing",
    "goaway",
)
"""How gRPC's own UNAVAILABLE details begin when the transport failed. A server's UNAVAILABLE begins with what it
is about ("model 'm' version 1 is not ready: upstream ... Failed to connect"), whatever words follow."""


def unreachable_hint(args: argparse.Namespace, exc: TensorgateClientError) -> str:
    """'cannot reach SERVER: ' only when the transport failed, not for a server that answered UNAVAILABLE (a model
    not loaded, a drain, a fronted model's upstream down); with TLS flags a dropped connection is likely a refused
    handshake, and without them a closed socket is likely a TLS port: say so."""
    if exc.code.name != "UNAVAILABLE" or not exc.details.lower().lstrip().startswith(TRANSPORT_FAILURES):
        return ""
    if any(getattr(args, name, None) for name in ("tls_ca", "tls_cert", "tls_key")):
        hint = " (TLS handshake refused? check --tls-ca/--tls-cert/--tls-key)"
    elif any(word in exc.details.lower() for word in ("socket closed", "connection reset")):
        # A TLS port closes a plaintext connection: gRPC says "Socket closed", or reports the peer's reset.
        hint = " (a TLS port? give --tls-ca, and --tls-cert/--tls-key for mutual TLS)"
    else:
        hint = ""
    return f"cannot reach {args.server}{hint}: "


def failed_call(args: argparse.Namespace, exc: TensorgateClientError, text: str | None = None) -> str:
    """How a command that talks to one server reports a call that failed: 'cannot reach SERVER: ' when the
    transport failed (`unreachable_hint`), 'SERVER: ' when the server answered, then `text` (by default
    'CODE: details') on one line, whatever line breaks the server's details hold."""
    where = unreachable_hint(args, exc) or (f"{args.server}: " if args.server else "")
    return where + " ".join((f"{exc.code.name}: {exc.details}" if text is None else text).split())


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("infer", help="run one inference on a server and print the outputs as JSON")
    p.add_argument("model", help="model name")
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an input: NAME=file.npy, NAME=file.json or NAME=<JSON list>; repeat for each input",
    )
    p.add_argument("--output", action="append", default=[], metavar="NAME", help="output to return (default: all)")
    p.add_argument(
        "--class-count",
        action="append",
        default=[],
        metavar="NAME=K",
        help='return output NAME as its top K classes ("value:index[:label]"); repeat for each output',
    )
    p.add_argument("--model-version", default=None, help="model version (default: the server's choice)")
    p.add_argument("--request-id", default=None, help="request id sent with the call")
    p.add_argument(
        "--sequence-id",
        default=None,
        metavar="ID",
        help="correlation ID of a sequence model's request (digits: an integer ID, which cannot be negative; "
        "anything else: a string ID)",
    )
    p.add_argument("--sequence-start", action="store_true", help="the first request of the sequence")
    p.add_argument("--sequence-end", action="store_true", help="the last request of the sequence")
    add_connection_arguments(p, DEFAULT_TIMEOUT_S)
    p.add_argument("--npy-out", type=Path, default=None, metavar="DIR", help="write each output to DIR/NAME.npy")


def add_connection_arguments(p: argparse.ArgumentParser, timeout: float) -> None:
    """--server, --timeout and the TLS options, shared by the commands that call a server."""
    p.add_argument(
        "--server",
        default=os.environ.get("TENSORGATE_SERVER") or "127.0.0.1:8001",
        help="host:port (default 127.0.0.1:8001) [env TENSORGATE_SERVER]",
    )
    p.add_argument("--timeout", type=float, default=timeout, help=f"seconds (default {timeout:g})")
    p.add_argument("--tls-ca", type=Path, default=None, help="CA bundle that signed the server's certificate")
    p.add_argument("--tls-cert", type=Path, default=None, help="client certificate (mTLS), with --tls-key")
    p.add_argument("--tls-key", type=Path, default=None, help="client private key (mTLS)")
    p.add_argument("--tls-server-name", default=None, help="check the server certificate for this name")
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding a bearer token, sent as 'authorization: Bearer TOKEN' "
        "[env TENSORGATE_TOKEN holds the token itself]",
    )


def tls_from_args(args: argparse.Namespace) -> TLSConfig | None:
    """The TLS settings given by add_connection_arguments' options, for every command that calls a server; raises
    UsageError for a bad combination, a file that cannot be read, or one TLSConfig refuses (no certificate in it, a
    key not the certificate's), naming the flag (the channel would report the bare path), in the same words from
    every command."""
    if not any((args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)):
        return None
    try:
        return TLSConfig(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
    except (OSError, ValueError) as exc:  # TLSConfig checks the files; its messages name the field and the file
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        text = text.removeprefix("TLSConfig: ")
        for field, flag in (("ca_file", "--tls-ca"), ("cert_file", "--tls-cert"), ("key_file", "--tls-key")):
            text = text.replace(field, flag)
        raise UsageError(text) from None


def headers_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The bearer token of --token-file, else of TENSORGATE_TOKEN, as an authorization header (a token is never
    taken on the command line, where `ps` would show it); raises UsageError for an unreadable or empty file."""
    token = os.environ.get("TENSORGATE_TOKEN", "").strip()
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--token-file {args.token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not token:
            raise UsageError(f"--token-file {args.token_file}: the file is empty")
    if not token:
        return {}
    headers = {"authorization": f"Bearer {token}"}
    try:
        check_headers(headers)
    except ValueError:
        raise UsageError("the bearer token must be printable ASCII on one line") from None
    return headers


def _parse_inputs(specs: list[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Arrays from .npy files, and JSON values still waiting for the model's datatypes."""
    arrays: dict[str, np.ndarray] = {}
    pending: dict[str, Any] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name:
            raise UsageError(f"--input {spec!r}: expected NAME=FILE.npy, NAME=FILE.json or NAME=JSON")
        if name in arrays or name in pending:
            raise UsageError(f"--input {name}: given more than once")
        try:
            if value.endswith(".npy"):
                arrays[name] = np.load(value, allow_pickle=False)
            elif value.endswith(".json"):
                pending[name] = json.loads(Path(value).read_text())
            else:
                pending[name] = json.loads(value)
        except OSError as exc:
            raise UsageError(f"--input {name}: {exc.strerror or exc}: {value}") from None
        except ValueError as exc:
            # dtype=object (text) .npy files are pickles, which are not loaded: a file could run code.
            hint = "; save text as fixed-width strings, array.astype(str)" if "allow_pickle" in str(exc) else ""
            raise UsageError(f"--input {name}: not valid JSON or .npy data: {exc}{hint}") from None
    return arrays, pending


def _as_array(name: str, value: Any, datatype: str | None) -> np.ndarray:
    try:
        if datatype == "BYTES" or (datatype is None and _all_strings(value)):
            raw = np.asarray(value, dtype=object)
            encoded: np.ndarray = np.vectorize(
                lambda v: v.encode() if isinstance(v, str) else str(v).encode(), otypes=[object]
            )(raw)
            return encoded
        if datatype is None:
            return np.asarray(value)
        dt = tensors.BY_NAME[datatype]
        with np.errstate(over="ignore", invalid="ignore"):  # what did not fit is refused below, with where it is
            array = np.asarray(value, dtype=dt.np_dtype)
        natural = np.asarray(value)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise UsageError(f"--input {name}: cannot make a {datatype or 'numpy'} tensor of it: {exc}") from None
    _check_lossless(name, natural, array, datatype, dt.floating)
    return array


def _check_lossless(name: str, natural: np.ndarray, array: np.ndarray, datatype: str, floating: bool) -> None:
    """JSON numbers that the datatype cannot hold are refused, not changed: 1.7 as INT32 would be sent as 1, 0.5 as
    BOOL as true, 70000 as FP16 as infinity (rounding a number to a float type is what floats do, and allowed)."""
    if natural.dtype.kind not in "biuf":
        return
    with np.errstate(invalid="ignore", over="ignore"):
        if floating:
            wide = array.astype(np.float64)
            lost = np.isfinite(natural.astype(np.float64)) & ~np.isfinite(wide)
        else:
            lost = array.astype(natural.dtype) != natural
    if np.any(lost):
        index = tuple(int(i) for i in np.argwhere(lost)[0])
        raise UsageError(f"--input {name}: {natural[index].item()!r} at {list(index)} does not fit {datatype}")


def _all_strings(value: Any) -> bool:
    if isinstance(value, list):
        return bool(value) and all(_all_strings(v) for v in value)
    return isinstance(value, str)


def _jsonable(array: np.ndarray) -> Any:
    if array.dtype == object:
        decoded = [v.decode("utf-8", "backslashreplace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
        return np.array(decoded, dtype=object).reshape(array.shape).tolist()
    return array.tolist()


def _class_counts(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        name, sep, k = item.partition("=")
        if not sep or not name or not re.fullmatch(r"[0-9]+", k) or int(k) < 1:
            raise UsageError(f"--class-count {item!r}: expected NAME=K with K a positive integer")
        counts[name] = int(k)
    return counts


def _sequence_id(text: str | None) -> int | str | None:
    """ASCII digits are an integer ID (unless the model takes string IDs: `_takes_string_ids`), a minus sign and
    digits a usage error (IDs are not negative), anything else a string ID."""
    if text is None or not re.fullmatch(r"-?[0-9]+", text):
        return text
    if text.startswith("-"):
        raise UsageError(f"--sequence-id {text}: an integer ID cannot be negative")
    if int(text) >= 2**64:
        raise UsageError(f"--sequence-id {text}: an integer ID must be below 2**64")
    return int(text)


def _takes_string_ids(client: InferenceClient, model: str, version: str | None) -> bool:
    """Whether the model's CORRID control is a string; False when its config cannot be read (then the server
    says what it wants)."""
    try:
        config = client.config(model, version)
    except TensorgateClientError:
        return False
    string = mc.TYPE_STRING
    return any(
        c.kind == mc.ModelSequenceBatching.Control.CONTROL_SEQUENCE_CORRID and c.data_type == string
        for entry in config.sequence_batching.control_input
        for c in entry.control
    )


def run(args: argparse.Namespace) -> int:
    try:
        class_counts = _class_counts(args.class_count)
        arrays, pending = _parse_inputs(args.input)
        if not arrays and not pending:
            raise UsageError("give at least one --input NAME=VALUE")
        tls = tls_from_args(args)
        headers = headers_from_args(args)
        if args.timeout <= 0:
            raise UsageError("--timeout must be positive")
        sequence_id = _sequence_id(args.sequence_id)
        if sequence_id in (None, 0, "") and (args.sequence_start or args.sequence_end):
            raise UsageError("--sequence-start and --sequence-end need a non-zero --sequence-id")
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        with InferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
            if isinstance(sequence_id, int) and _takes_string_ids(client, args.model, args.model_version):
                sequence_id = args.sequence_id  # "007" for a model whose CORRID is a string stays "007"
            # A float or raw ("|V2") file may be for a BF16 input, which .npy cannot hold (`tensors.from_npy`).
            maybe_bf16 = [name for name, a in arrays.items() if a.dtype.kind in "fV"]
            if pending or maybe_bf16:
                declared = _declared_datatypes(client, args.model, args.model_version, sorted(pending))
                for name, value in pending.items():
                    arrays[name] = _as_array(name, value, declared.get(name))
                for name in maybe_bf16:
                    arrays[name] = tensors.from_npy(arrays[name], declared.get(name, ""))
            request: dict[str, Any] = {
                "model": args.model,
                "inputs": arrays,
                "outputs": args.output or None,
                "version": args.model_version,
                "request_id": args.request_id,
                "sequence_id": sequence_id,
                "sequence_start": args.sequence_start,
                "sequence_end": args.sequence_end,
            }
            try:
                result = client.infer(**request, class_counts=class_counts or None)
            except Unimplemented:
                if not _decoupled(client, args.model, args.model_version):
                    raise
                if class_counts:
                    raise UsageError("--class-count is not for a decoupled model") from None
                return asyncio.run(_stream(args, tls, headers, request))
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except TensorgateClientError as exc:
        details = " ".join(exc.details.split())  # one line, whatever the server sent
        print(f"{PROG}: {unreachable_hint(args, exc)}{exc.code.name}: {details}", file=sys.stderr)
        return 1
    except (OSError, ValueError, TypeError) as exc:  # unreadable TLS files; an array the protocol cannot carry
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    try:
        _show(args, result)
    except OSError as exc:  # --npy-out where nothing can be written
        print(f"{PROG}: --npy-out: {exc}", file=sys.stderr)
        return 2
    return 0


async def _stream(
    args: argparse.Namespace, tls: TLSConfig | None, headers: dict[str, str], request: dict[str, Any]
) -> int:
    """A decoupled model's request: each response is shown as it arrives (a model streaming tokens shows them as
    they are made); an empty final response, which only marks the end, shows nothing."""
    async with AsyncInferenceClient(args.server, timeout=args.timeout, tls=tls, headers=headers) as client:
        index = 0
        async for item in client.stream_infer([request]):
            if isinstance(item, StreamItemError):  # its code is tensorgate's (UNKNOWN from a server without)
                print(f"{PROG}: {item.code.name}: {' '.join(item.details.split())}", file=sys.stderr)
                return 1
            if item.outputs:
                _show(args, item, index)
                index += 1
    return 0


def _declared_datatypes(
    client: InferenceClient, model: str, version: str | None, json_inputs: list[str]
) -> dict[str, str]:
    """The datatypes the model declares for its inputs: JSON inputs need them, and a float .npy file may be meant
    for a BF16 input. A caller whose policy allows inference but not metadata can still send .npy files, with
    their own dtypes; for JSON inputs the refusal says what to do instead."""
    try:
        meta = client.metadata(model, version)
    except PermissionDenied as exc:
        if not json_inputs:
            return {}
        raise PermissionDenied(
            f"{exc.details} (tensorgate infer reads the model's metadata to give the JSON inputs "
            f"{', '.join(json_inputs)} their datatypes: give them as .npy files, which carry their own, or allow "
            "this identity the 'metadata' API)",
            method=exc.method,
        ) from exc
    return {t.name: t.datatype for t in meta.inputs}


def _decoupled(client: InferenceClient, model: str, version: str | None) -> bool:
    """Whether the model answers over ModelStreamInfer only; False when its config cannot be read (the caller
    then reports the refusal it had)."""
    try:
        return client.config(model, version).model_transaction_policy.decoupled
    except TensorgateClientError:
        return False


def _show(args: argparse.Namespace, result: InferResult, index: int | None = None) -> None:
    """One response: a JSON line, or NAME.npy files (NAME.<index>.npy for a decoupled model's responses)."""
    if args.npy_out is not None:
        args.npy_out.mkdir(parents=True, exist_ok=True)
        for name, array in result.outputs.items():
            path = args.npy_out / (f"{name}.npy" if index is None else f"{name}.{index}.npy")
            if array.dtype == tensors.BY_NAME["BF16"].np_dtype:
                array = array.astype(np.float32)  # .npy has no bfloat16 (it reads back as bytes); float32 is exact
            np.save(path, array, allow_pickle=array.dtype == object)
            print(path, flush=True)
        return
    body = {
        "model": result.model,
        "version": result.version,
        "id": result.id,
        "outputs": {
            name: {
                "datatype": tensors.from_numpy(array.dtype).name,
                "shape": list(array.shape),
                "data": _jsonable(array),
            }
            for name, array in result.outputs.items()
        },
    }
    print(json.dumps(body), flush=True)
