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
"""

import copy
import sys
import threading

import moto.dynamodb.models as dynamodb_models
from moto import server
from moto.dynamodb.models import DynamoDBBackend
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
        return _call_action(self)


DynamoHandler.call_action = call_action

if __name__ == "__main__":
    server.main(sys.argv[1:])
