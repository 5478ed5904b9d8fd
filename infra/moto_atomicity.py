"""Checks that the moto `infra/moto.sh` started keeps DynamoDB's promises
under concurrent load (`infra/moto_server.py`): acknowledged writes stay
written, a cancelled transaction leaves nothing behind, no request fails
with a server error. Run by `make test` right after moto starts; against
plain `moto_server` 5.2.5 one run lost 2 of 600 acknowledged increments,
left 1 item of a cancelled transaction and answered 5 requests with 500.

    python infra/moto_atomicity.py http://127.0.0.1:PORT
"""

import sys
import threading
import uuid

import boto3
import botocore.config

WRITERS, TRANSACTORS = 4, 4
INCREMENTS, TRANSACTIONS = 150, 40


def main(url):
    client = boto3.client(
        "dynamodb",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    table = f"atomicity-{uuid.uuid4().hex[:10]}"
    client.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    # A table big enough that copying it takes a while.
    for i in range(1000):
        client.put_item(TableName=table, Item={"PK": {"S": f"seed{i}"}, "v": {"S": "x" * 200}})

    acknowledged, failures = [0], []
    lock = threading.Lock()

    def increments(n):
        for _ in range(INCREMENTS):
            try:
                client.update_item(
                    TableName=table,
                    Key={"PK": {"S": f"counter{n}"}},
                    UpdateExpression="ADD n :one",
                    ExpressionAttributeValues={":one": {"N": "1"}},
                )
                with lock:
                    acknowledged[0] += 1
            except Exception as e:  # noqa: BLE001 - every failure is a finding
                with lock:
                    failures.append(str(e))

    def cancelled_transactions(n):
        for i in range(TRANSACTIONS):
            try:
                client.transact_write_items(
                    TransactItems=[
                        {"Put": {"TableName": table, "Item": {"PK": {"S": f"tx{n}-{i}"}}}},
                        {
                            "ConditionCheck": {
                                "TableName": table,
                                "Key": {"PK": {"S": "missing"}},
                                "ConditionExpression": "attribute_exists(PK)",
                            }
                        },
                    ]
                )
                with lock:
                    failures.append("a transaction whose condition fails was answered success")
            except client.exceptions.TransactionCanceledException:
                pass
            except Exception as e:  # noqa: BLE001
                with lock:
                    failures.append(str(e))

    threads = [threading.Thread(target=increments, args=(n,)) for n in range(WRITERS)]
    threads += [threading.Thread(target=cancelled_transactions, args=(n,)) for n in range(TRANSACTORS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    present = 0
    for n in range(WRITERS):
        item = client.get_item(TableName=table, Key={"PK": {"S": f"counter{n}"}}, ConsistentRead=True).get("Item")
        present += int(item["n"]["N"]) if item else 0
    left = [
        it["PK"]["S"]
        for page in client.get_paginator("scan").paginate(TableName=table)
        for it in page["Items"]
        if it["PK"]["S"].startswith("tx")
    ]
    client.delete_table(TableName=table)
    problems = []
    if present != acknowledged[0]:
        problems.append(f"{acknowledged[0]} increments acknowledged, {present} present")
    if left:
        problems.append(f"{len(left)} items of cancelled transactions left: {left[:5]}")
    if failures:
        problems.append(f"{len(failures)} requests failed: {failures[:3]}")
    if problems:
        sys.exit("moto is not atomic: " + "; ".join(problems))
    print(f"moto atomicity: {acknowledged[0]} increments kept, {TRANSACTORS * TRANSACTIONS} cancelled transactions left nothing")


if __name__ == "__main__":
    main(sys.argv[1])
