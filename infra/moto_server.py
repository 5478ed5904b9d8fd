"""moto's server, with DynamoDB transactions that are atomic.

`moto_server` (moto 5.2.5) answers requests on many threads, and its
TransactWriteItems keeps a deep copy of every table it touches so that it
can roll back by putting the copy in the table's place. Under concurrent
load that breaks what DynamoDB promises and what ratepool relies on:

- the copy is taken while other threads write the table, and fails with
  "dictionary changed size during iteration" (an HTTP 500);
- a rollback puts back the table as it was when the transaction began, so
  every write another request made in the meantime is lost (seen in the AWS
  kill storm: a job's final write undone, a steps_done counter one behind
  its checkpoint items);
- a copy of the whole table per transaction costs time and memory that grow
  with the table: the kill storm's moto grew by 20-30 MB/s and stalled.

This wrapper runs DynamoDB requests one at a time (they are short; SQS's
long polls are not held up) and rolls a cancelled transaction back item by
item from a copy of only the items it names, as DynamoDB's own isolation
would leave them. Everything else is moto's own server: same options
(`-H`, `-p`, ...), same answers.

It also keeps an account of what the requests would cost on AWS, since the
last reset, for `ratepool bench` (checked by infra/moto_capacity.py):

- requests per service and action (DynamoDB `PutItem`, SQS `SendMessage`,
  CloudWatch `PutMetricData`, Secrets Manager `GetSecretValue`, S3 by method
  and whether it names an object: `PUT object`, `GET bucket`);
- DynamoDB capacity units per table, by DynamoDB's documented item sizes
  (moto bills none): a write is ceil(max(size before, size after) / 1 KB)
  units, at least 1, also when its condition fails; a transaction's items
  twice that (a cancelled transaction too; its Puts as if applied); a read
  ceil(size / 4 KB), at least 1, halved when eventually consistent; a
  Query or Scan page sums the items it reads before any filter.

    GET  /_ratepool/usage        the account, as JSON (see `_usage_json`)
    POST /_ratepool/usage/reset  zeroes it

Accounting never changes an answer: if it fails, it says so on stderr once
and the request is answered (and counted) as usual.
"""

import base64
import copy
import inspect
import io
import json
import math
import re
import sys
import threading
import traceback
from collections import defaultdict
from urllib.parse import parse_qs

import moto.dynamodb.models as dynamodb_models
from moto import server
from moto.dynamodb.models import DynamoDBBackend, dynamodb_backends
from moto.dynamodb.models.dynamo_type import DynamoType
from moto.dynamodb.models.table import Table
from moto.dynamodb.responses import DynamoHandler

_dynamodb = threading.RLock()
_in_transaction = threading.local()


class _CopyModule:
    """`copy` as moto's DynamoDB backend sees it: inside a transaction, a
    table is not copied (the transaction keeps its own undo log)."""

    copy = staticmethod(copy.copy)

    @staticmethod
    def deepcopy(x, memo=None):
        if isinstance(x, Table) and getattr(_in_transaction, "on", False):
            return x
        return copy.deepcopy(x, memo)


dynamodb_models.copy = _CopyModule


def _key(table, attrs):
    hash_key = DynamoType(attrs[table.hash_key_attr])
    range_key = DynamoType(attrs[table.range_key_attr]) if table.range_key_attr else None
    return hash_key, range_key


def _restore(table, hash_key, range_key, old):
    if range_key is None:
        if old is None:
            table.items.pop(hash_key, None)
        else:
            table.items[hash_key] = old
    elif old is None:
        table.items.get(hash_key, {}).pop(range_key, None)
    else:
        table.items[hash_key][range_key] = old


_transact_write_items = DynamoDBBackend.transact_write_items


def transact_write_items(self, transact_items):
    undo = []
    for entry in transact_items:
        op_type, op = next(iter(entry.items()))
        table = self.tables.get(op.get("TableName"))
        attrs = op.get("Item") if op_type == "Put" else op.get("Key")
        if table is None or not attrs:
            continue  # moto answers these with its own validation error
        try:
            hash_key, range_key = _key(table, attrs)
        except KeyError:
            continue
        undo.append((table, hash_key, range_key, copy.deepcopy(table.get_item(hash_key, range_key))))
    _in_transaction.on = True
    try:
        return _transact_write_items(self, transact_items)
    except BaseException:
        for table, hash_key, range_key, old in reversed(undo):
            _restore(table, hash_key, range_key, old)
        raise
    finally:
        _in_transaction.on = False


DynamoDBBackend.transact_write_items = transact_write_items

_call_action = DynamoHandler.call_action


def call_action(self):
    with _dynamodb:
        try:
            plan = _capacity_plan(self)
        except Exception:  # noqa: BLE001 - accounting never fails a request
            _complain("dynamodb capacity (before)")
            plan = None
        _reads.pages = [] if plan is not None else None
        response = None
        try:
            response = _call_action(self)
            return response
        finally:
            pages, _reads.pages = _reads.pages, None
            if plan is not None:
                try:
                    if _consumed(response):
                        _charge(plan, pages)
                except Exception:  # noqa: BLE001
                    _complain("dynamodb capacity (after)")


DynamoHandler.call_action = call_action


# ---------------------------------------------------------------------------
# Accounting: what the requests would cost on AWS.

_complained = set()


def _complain(where):
    """Says on stderr, once per place, that accounting failed there."""
    if where not in _complained:
        _complained.add(where)
        print(f"moto_server.py: accounting failed in {where} (counted anyway):", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)


class _Usage:
    SERVICES = ("dynamodb", "sqs", "cloudwatch", "secretsmanager", "s3")

    def __init__(self):
        self.lock = threading.Lock()
        self.reset()

    def reset(self):
        with self.lock:
            self.requests = defaultdict(lambda: defaultdict(int))
            self.capacity = defaultdict(lambda: {"write_units": 0.0, "read_units": 0.0})

    def count(self, service, action):
        with self.lock:
            self.requests[service][action] += 1

    def charge(self, table, write=0.0, read=0.0):
        with self.lock:
            units = self.capacity[table]
            units["write_units"] += write
            units["read_units"] += read

    def snapshot(self):
        with self.lock:
            requests = {service: {} for service in self.SERVICES}
            for service, actions in self.requests.items():
                requests[service] = dict(sorted(actions.items()))
            capacity = {table: dict(units) for table, units in sorted(self.capacity.items())}
        return requests, capacity


_usage = _Usage()


# DynamoDB item sizes, as "Item sizes and formats" in the DynamoDB developer
# guide has them: an attribute is its name's UTF-8 bytes plus its value's.


def _utf8(text):
    return len(text.encode("utf-8")) if isinstance(text, str) else len(text)


def _number_size(value):
    """About 1 byte per two significant digits (leading and trailing zeroes
    trimmed), plus 1; a negative number 1 more; at most 21."""
    text = str(value).strip().lower()
    negative = text.startswith("-")
    mantissa = text.lstrip("+-").split("e")[0]
    digits = mantissa.replace(".", "").strip("0")
    return min(21, (max(len(digits), 1) + 1) // 2 + 1 + negative)


def _binary_size(value):
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    try:
        return len(base64.b64decode(value, validate=True))
    except (ValueError, TypeError):
        return _utf8(value)


def _value_size(value):
    """The size of one attribute value: a DynamoType or its wire JSON form."""
    if isinstance(value, DynamoType):
        kind, inner = value.type, value.value
    else:
        ((kind, inner),) = value.items()
    if kind == "S":
        return _utf8(inner)
    if kind == "N":
        return _number_size(inner)
    if kind == "B":
        return _binary_size(inner)
    if kind in ("BOOL", "NULL"):
        return 1
    if kind == "SS":
        return sum(_utf8(e) for e in inner)
    if kind == "NS":
        return sum(_number_size(e) for e in inner)
    if kind == "BS":
        return sum(_binary_size(e) for e in inner)
    if kind == "L":
        return 3 + sum(1 + _value_size(e) for e in inner)
    if kind == "M":
        return 3 + sum(1 + _utf8(k) + _value_size(e) for k, e in inner.items())
    raise ValueError(f"unknown DynamoDB type {kind!r}")


def _item_size(item):
    """The size of an item: a moto Item, its attributes, or wire JSON; 0 for none."""
    if item is None:
        return 0
    attrs = getattr(item, "attrs", item)
    return sum(_utf8(name) + _value_size(value) for name, value in attrs.items())


def _write_units(size):
    return max(1, math.ceil(size / 1024))


def _read_units(size, consistent):
    return max(1, math.ceil(size / 4096)) * (1.0 if consistent else 0.5)


# Query and Scan pages: the items a page reads (after the key condition,
# before any filter) are what DynamoDB bills. moto's Table.query and
# Table.scan filter and project at the very end: run them without the
# filter and projection, note the size of what was read, then filter and
# project the same way.
_reads = threading.local()


def _reading(method, filter_name, projection_name):
    signature = inspect.signature(method)

    def read(self, *args, **kwargs):
        pages = getattr(_reads, "pages", None)
        if pages is None:
            return method(self, *args, **kwargs)
        try:
            bound = signature.bind(self, *args, **kwargs)
            filter_expression = bound.arguments.get(filter_name)
            projection = bound.arguments.get(projection_name)
            bound.arguments[filter_name] = None
            bound.arguments[projection_name] = None
        except Exception:  # noqa: BLE001
            _complain(f"Table.{method.__name__}")
            return method(self, *args, **kwargs)
        results, scanned_count, last_evaluated_key = method(*bound.args, **bound.kwargs)
        try:
            pages.append((self.name, sum(_item_size(r) for r in results)))
        except Exception:  # noqa: BLE001
            _complain(f"Table.{method.__name__} sizes")
        if filter_expression is not None:
            results = [item for item in results if filter_expression.expr(item)]
        if projection:
            results = [r.project(projection) for r in results]
        return results, scanned_count, last_evaluated_key

    return read


Table.query = _reading(Table.query, "filter_expression", "projection_expressions")
Table.scan = _reading(Table.scan, "filter_expression", "projection_expression")


def _table(backend, name):
    if not isinstance(name, str):
        return None
    return backend.tables.get(name.rsplit(":table/", 1)[-1])


class _Plan:
    """What a DynamoDB request touches, noted before moto runs it."""

    def __init__(self, action, consistent=False):
        self.action = action
        self.consistent = consistent
        self.writes = []  # (table, hash key, range key, size before, factor, size at least)
        self.reads = []  # (table name, read units)

    @staticmethod
    def _located(backend, name, attrs):
        """(table, hash key, range key, size now) of the item `attrs` names, or None."""
        table = _table(backend, name)
        if table is None or not attrs:
            return None
        try:
            hash_key, range_key = _key(table, attrs)
        except KeyError:
            return None  # moto answers with its own validation error
        return table, hash_key, range_key, _item_size(table.get_item(hash_key, range_key))

    def write(self, backend, name, attrs, factor=1, applied=None):
        found = self._located(backend, name, attrs)
        if found is not None:
            self.writes.append((*found, factor, _item_size(applied)))

    def read(self, backend, name, attrs, consistent, factor=1):
        found = self._located(backend, name, attrs)
        if found is not None:
            table, _, _, size = found
            self.reads.append((table.name, factor * _read_units(size, consistent)))


def _capacity_plan(handler):
    target = handler.headers.get("X-Amz-Target") or ""
    action = target.rsplit(".", 1)[-1]
    if action not in _PLANNERS:
        return None
    body = handler.body
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8")
    request = json.loads(body) if isinstance(body, str) and body else (body or {})
    plan = _Plan(action, consistent=bool(request.get("ConsistentRead")))
    _PLANNERS[action](plan, handler.dynamodb_backend, request)
    return plan


def _plan_put(plan, backend, request):
    plan.write(backend, request.get("TableName"), request.get("Item"))


def _plan_by_key(plan, backend, request):
    plan.write(backend, request.get("TableName"), request.get("Key"))


def _plan_batch_write(plan, backend, request):
    for name, entries in (request.get("RequestItems") or {}).items():
        for entry in entries:
            if "PutRequest" in entry:
                plan.write(backend, name, entry["PutRequest"].get("Item"))
            elif "DeleteRequest" in entry:
                plan.write(backend, name, entry["DeleteRequest"].get("Key"))


def _plan_transact_write(plan, backend, request):
    for entry in request.get("TransactItems") or []:
        op_type, op = next(iter(entry.items()))
        if op_type == "Put":
            # Cancelled or not, a Put is charged as if applied.
            plan.write(backend, op.get("TableName"), op.get("Item"), 2, applied=op.get("Item"))
        else:  # Update, Delete, ConditionCheck
            plan.write(backend, op.get("TableName"), op.get("Key"), 2)


def _plan_get(plan, backend, request):
    plan.read(backend, request.get("TableName"), request.get("Key"), plan.consistent)


def _plan_batch_get(plan, backend, request):
    for name, spec in (request.get("RequestItems") or {}).items():
        for key in spec.get("Keys") or []:
            plan.read(backend, name, key, bool(spec.get("ConsistentRead")))


def _plan_transact_get(plan, backend, request):
    for entry in request.get("TransactItems") or []:
        op = entry.get("Get") or {}
        plan.read(backend, op.get("TableName"), op.get("Key"), True, factor=2)


def _plan_pages(plan, backend, request):
    pass  # Query and Scan: the pages are noted as moto reads them


_PLANNERS = {
    "PutItem": _plan_put,
    "UpdateItem": _plan_by_key,
    "DeleteItem": _plan_by_key,
    "BatchWriteItem": _plan_batch_write,
    "TransactWriteItems": _plan_transact_write,
    "GetItem": _plan_get,
    "BatchGetItem": _plan_batch_get,
    "TransactGetItems": _plan_transact_get,
    "Query": _plan_pages,
    "Scan": _plan_pages,
}


# Errors that still consume capacity; others (a malformed request, a
# missing table) are refused before any item is read or written.
_CONSUMING_ERRORS = ("ConditionalCheckFailedException", "TransactionCanceledException")


def _consumed(response):
    if response is None:  # moto failed: a server error
        return False
    status, _, body = response
    if int(status) < 400:
        return True
    if isinstance(body, (bytes, bytearray)):
        body = body.decode("utf-8", "replace")
    return any(error in str(body) for error in _CONSUMING_ERRORS)


def _charge(plan, pages):
    for table, hash_key, range_key, before, factor, applied in plan.writes:
        after = _item_size(table.get_item(hash_key, range_key))
        _usage.charge(table.name, write=factor * _write_units(max(before, after, applied)))
    for name, units in plan.reads:
        _usage.charge(name, read=units)
    for name, size in pages or []:
        _usage.charge(name, read=_read_units(size, plan.consistent))


def _items_json():
    """Items and their bytes per table, now (every account and region)."""
    tables = defaultdict(lambda: {"count": 0, "bytes": 0, "max_bytes": 0})
    with _dynamodb:
        for regions in list(dict.values(dynamodb_backends)):
            for backend in list(dict.values(regions)):
                for table in list(backend.tables.values()):
                    entry = tables[table.name]
                    for hash_set in list(table.items.values()):
                        for item in list(hash_set.values()) if table.range_key_attr else [hash_set]:
                            size = _item_size(item)
                            entry["count"] += 1
                            entry["bytes"] += size
                            entry["max_bytes"] = max(entry["max_bytes"], size)
    return dict(sorted(tables.items()))


def _usage_json():
    """{"requests": {"dynamodb": {"PutItem": n, ...}, "sqs": {...},
    "cloudwatch": {...}, "secretsmanager": {...}, "s3": {"PUT object": n,
    ...}}, "dynamodb_capacity": {table: {"write_units": x, "read_units": y}},
    "dynamodb_items": {table: {"count": n, "bytes": b, "max_bytes": m}}}"""
    requests, capacity = _usage.snapshot()
    return {"requests": requests, "dynamodb_capacity": capacity, "dynamodb_items": _items_json()}


# Requests per service and action, counted as they come in.

_CREDENTIAL = re.compile(r"Credential=[^/,\s]*/[^/]*/[^/]*/([^/]+)/")
_SCOPES = {"monitoring": "cloudwatch"}
_TARGETS = {
    "DynamoDB_20120810": "dynamodb",
    "AmazonSQS": "sqs",
    "secretsmanager": "secretsmanager",
    "GraniteServiceVersion20100801": "cloudwatch",
}
_RPC_PATH = re.compile(r"^/service/([^/]+)/operation/([^/?]+)")


def _form_body(environ):
    """The body of a form-encoded request (AWS's Query protocol), put back
    for moto to read again, as moto's own dispatcher does."""
    if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        return ""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return ""
    if not length:
        return ""
    body = environ["wsgi.input"].read(length)
    environ["wsgi.input"] = io.BytesIO(body)
    return body.decode("utf-8", "replace")


def _service_and_action(environ):
    path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
    query = environ.get("QUERY_STRING", "")
    # The service signed for: "Credential=KEY/DATE/REGION/SERVICE/aws4_request",
    # in the Authorization header or a presigned URL.
    signed = environ.get("HTTP_AUTHORIZATION", "") + " " + query.replace("%2F", "/").replace("X-Amz-", "")
    match = _CREDENTIAL.search(signed)
    service = _SCOPES.get(match.group(1), match.group(1)) if match else None
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:  # AWS's JSON protocols: "AmazonSQS.SendMessage"
        prefix, _, action = target.partition(".")
        return service or _TARGETS.get(prefix, prefix), action or prefix
    rpc = _RPC_PATH.match(path)
    if rpc:  # Smithy RPC v2: "/service/GraniteServiceVersion20100801/operation/PutMetricData"
        return service or _TARGETS.get(rpc.group(1), rpc.group(1)), rpc.group(2)
    if service not in (None, "s3"):  # AWS's Query protocol: "Action=PutMetricData"
        form = parse_qs(_form_body(environ)) or parse_qs(query)
        return service, (form.get("Action") or [method])[0]
    if service is None:
        form = parse_qs(_form_body(environ)) or parse_qs(query)
        if "Action" in form:
            return "unknown", form["Action"][0]
    return "s3", _s3_action(environ, path, method)


def _s3_action(environ, path, method):
    """`PUT object`, `GET bucket`, `GET service` (the bucket list)."""
    host = environ.get("HTTP_HOST", "").rsplit(":", 1)[0]
    # Virtual-hosted style ("BUCKET.s3.REGION.amazonaws.com", "BUCKET.localhost")
    # names the bucket in the host; path style ("/BUCKET/KEY") in the path.
    if (".s3." in host and not host.startswith("s3.")) or host.endswith(".localhost"):
        bucket, key = host.split(".", 1)[0], path.lstrip("/")
    else:
        bucket, _, key = path.lstrip("/").partition("/")
    kind = "object" if key else "bucket" if bucket else "service"
    return f"{method} {kind}"


def _route(environ, start_response):
    """The /_ratepool/ routes."""
    path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
    if path == "/_ratepool/usage" and method == "GET":
        status, body = "200 OK", _usage_json()
    elif path == "/_ratepool/usage/reset" and method == "POST":
        _usage.reset()
        status, body = "200 OK", {"reset": True}
    else:
        status, body = "404 Not Found", {"error": f"no route {method} {path}"}
    data = json.dumps(body).encode("utf-8")
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


_dispatch = server.DomainDispatcherApplication.__call__


def dispatch(self, environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/_ratepool/"):
        return _route(environ, start_response)
    if not path.startswith("/moto-api") and path != "/favicon.ico":
        try:
            service, action = _service_and_action(environ)
        except Exception:  # noqa: BLE001
            _complain("request counting")
            service, action = "unknown", "?"
        _usage.count(service, action)
    return _dispatch(self, environ, start_response)


server.DomainDispatcherApplication.__call__ = dispatch

if __name__ == "__main__":
    server.main(sys.argv[1:])
