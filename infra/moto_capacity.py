"""Checks the account the moto `infra/moto.sh` started keeps of what its
requests would cost on AWS (`infra/moto_server.py`, `GET /_ratepool/usage`),
which `ratepool bench` reports: DynamoDB capacity units by DynamoDB's
documented item sizes, and requests per service and action. Every expected
number below is worked out by hand from the DynamoDB developer guide
("Item sizes and formats", "Capacity unit consumption"), not asked of the
server. Run by `make test` right after moto starts; under a second.

    python infra/moto_capacity.py http://127.0.0.1:PORT
"""

import json
import sys
import urllib.request
import uuid

import boto3
import botocore.config

problems = []


def usage(url):
    with urllib.request.urlopen(f"{url}/_ratepool/usage", timeout=10) as response:
        return json.load(response)


def reset(url):
    request = urllib.request.Request(f"{url}/_ratepool/usage/reset", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def units(url, table):
    entry = usage(url)["dynamodb_capacity"].get(table, {})
    return entry.get("write_units", 0), entry.get("read_units", 0)


def expect(url, table, what, write, read, action):
    """Runs `action` and checks the write and read units it cost `table`."""
    write0, read0 = units(url, table)
    action()
    write1, read1 = units(url, table)
    got = (write1 - write0, read1 - read0)
    if got != (write, read):
        problems.append(f"{what}: expected {write} WCU / {read} RCU, got {got[0]} WCU / {got[1]} RCU")


def main(url):
    settings = dict(
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="test",
        aws_secret_access_key="test",
        config=botocore.config.Config(retries={"max_attempts": 1}),
    )
    dynamodb = boto3.client("dynamodb", **settings)
    sqs = boto3.client("sqs", **settings)
    cloudwatch = boto3.client("cloudwatch", **settings)
    run = uuid.uuid4().hex[:10]
    table, ranged, sized = f"capacity-{run}", f"capacity-q-{run}", f"capacity-s-{run}"
    dynamodb.create_table(
        TableName=table,
        KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.create_table(
        TableName=ranged,
        KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}, {"AttributeName": "SK", "KeyType": "RANGE"}],
        AttributeDefinitions=[
            {"AttributeName": "PK", "AttributeType": "S"},
            {"AttributeName": "SK", "AttributeType": "S"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.create_table(
        TableName=sized,
        KeySchema=[{"AttributeName": "PK", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "PK", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    reset(url)
    after_reset = usage(url)
    if any(after_reset["requests"].values()) or after_reset["dynamodb_capacity"]:
        problems.append(f"reset left counts: {after_reset['requests']} {after_reset['dynamodb_capacity']}")

    def put(name, item, **kwargs):
        return lambda: dynamodb.put_item(TableName=name, Item=item, **kwargs)

    # An item is the UTF-8 bytes of its attribute names plus its values.
    # "PK"="put": 2 + 3 = 5; "d" = 1494 x: 1 + 1494 = 1495; 1500 bytes,
    # ceil(1500 / 1024) = 2 WCU.
    expect(url, table, "PutItem of 1500 bytes", 2, 0, put(table, {"PK": {"S": "put"}, "d": {"S": "x" * 1494}}))

    # "PK"="grow": 2 + 4 = 6; "d" = 915 x: 1 + 915 = 916; 922 bytes (0.9 KB), 1 WCU.
    grow = {"PK": {"S": "grow"}}
    expect(url, table, "PutItem of 922 bytes", 1, 0, put(table, {**grow, "d": {"S": "x" * 915}}))
    # + "e" = 204 x: 1 + 204 = 205; 1127 bytes (1.1 KB): max(922, 1127) -> 2 WCU.
    expect(url, table, "UpdateItem growing 922 to 1127 bytes", 2, 0, lambda: dynamodb.update_item(
        TableName=table, Key=grow, UpdateExpression="SET e = :e", ExpressionAttributeValues={":e": {"S": "y" * 204}}))
    # Back to 922 bytes: the size before counts, max(1127, 922) -> 2 WCU.
    expect(url, table, "UpdateItem shrinking 1127 to 922 bytes", 2, 0, lambda: dynamodb.update_item(
        TableName=table, Key=grow, UpdateExpression="REMOVE e"))

    # "PK"="big3": 2 + 4 = 6; "d" = 2993 x: 1 + 2993 = 2994; 3000 bytes, 3 WCU.
    big3 = {"PK": {"S": "big3"}, "d": {"S": "x" * 2993}}
    expect(url, table, "PutItem of 3000 bytes", 3, 0, put(table, big3))

    def failed_put():
        try:
            dynamodb.put_item(TableName=table, Item={"PK": {"S": "big3"}}, ConditionExpression="attribute_not_exists(PK)")
            problems.append("a PutItem whose condition fails was answered success")
        except dynamodb.exceptions.ConditionalCheckFailedException:
            pass

    # A failed condition still costs the existing item's size: 3000 bytes, 3 WCU.
    expect(url, table, "failed conditional PutItem on 3000 bytes", 3, 0, failed_put)

    def malformed_update():
        try:
            dynamodb.update_item(TableName=table, Key={"PK": {"S": "big3"}}, UpdateExpression="SET")
            problems.append("a malformed UpdateItem was answered success")
        except dynamodb.exceptions.ClientError as e:
            if e.response["Error"]["Code"] != "ValidationException":
                raise

    # A malformed request is refused before anything is read: nothing.
    expect(url, table, "malformed UpdateItem", 0, 0, malformed_update)

    # A transaction costs 2 x each item's units: {"PK"="tx1"} is 5 bytes, 1 WCU;
    # two of them: 2 x 1 + 2 x 1 = 4 WCU.
    expect(url, table, "TransactWriteItems of two small Puts", 4, 0, lambda: dynamodb.transact_write_items(TransactItems=[
        {"Put": {"TableName": table, "Item": {"PK": {"S": "tx1"}}}},
        {"Put": {"TableName": table, "Item": {"PK": {"S": "tx2"}}}},
    ]))

    def cancelled():
        try:
            dynamodb.transact_write_items(TransactItems=[
                {"Put": {"TableName": table, "Item": {"PK": {"S": "tx3"}}}},
                {"ConditionCheck": {"TableName": table, "Key": {"PK": {"S": "missing"}},
                                    "ConditionExpression": "attribute_exists(PK)"}},
            ])
            problems.append("a transaction whose condition fails was answered success")
        except dynamodb.exceptions.TransactionCanceledException:
            pass

    # Cancelled, it still costs: the Put as if applied, 2 x 1; the check of
    # a missing item, 2 x 1 at least: 4 WCU.
    expect(url, table, "cancelled TransactWriteItems", 4, 0, cancelled)

    # "PK"="big5": 2 + 4 = 6; "d" = 5113 x: 1 + 5113 = 5114; 5120 bytes (5 KB), 5 WCU.
    big5 = {"PK": {"S": "big5"}}
    expect(url, table, "PutItem of 5120 bytes", 5, 0, put(table, {**big5, "d": {"S": "x" * 5113}}))
    # Strongly consistent: ceil(5120 / 4096) = 2 RCU; eventually consistent: half, 1.
    expect(url, table, "strong GetItem of 5120 bytes", 0, 2, lambda: dynamodb.get_item(
        TableName=table, Key=big5, ConsistentRead=True))
    expect(url, table, "eventual GetItem of 5120 bytes", 0, 1, lambda: dynamodb.get_item(TableName=table, Key=big5))
    # What is read counts, not what is returned: projected to PK, still 1 RCU.
    expect(url, table, "eventual GetItem of 5120 bytes, projected", 0, 1, lambda: dynamodb.get_item(
        TableName=table, Key=big5, ProjectionExpression="PK"))
    # An item not found still costs the minimum: 0.5 RCU eventually consistent.
    expect(url, table, "eventual GetItem of a missing item", 0, 0.5, lambda: dynamodb.get_item(
        TableName=table, Key={"PK": {"S": "missing"}}))
    # Per item as GetItem: 2 (strong, 5120 bytes) + 1 (strong, missing) = 3 RCU.
    expect(url, table, "BatchGetItem", 0, 3, lambda: dynamodb.batch_get_item(RequestItems={
        table: {"Keys": [big5, {"PK": {"S": "missing"}}], "ConsistentRead": True}}))
    # 2 x strongly consistent: 2 x 2 = 4 RCU.
    expect(url, table, "TransactGetItems", 0, 4, lambda: dynamodb.transact_get_items(TransactItems=[
        {"Get": {"TableName": table, "Key": big5}}]))

    # "PK"="q": 2 + 1 = 3; "SK"="1": 2 + 1 = 3; "d" = 2041 x: 1 + 2041 = 2042;
    # 2048 bytes (2 KB), 2 WCU each.
    for sk in "123":
        expect(url, ranged, f"PutItem of 2048 bytes ({sk})", 2, 0, put(
            ranged, {"PK": {"S": "q"}, "SK": {"S": sk}, "d": {"S": "x" * 2041}}))
    query = dict(TableName=ranged, KeyConditionExpression="PK = :q", ExpressionAttributeValues={":q": {"S": "q"}})
    # Three items, 6144 bytes, rounded up once: ceil(6144 / 4096) = 2 RCU
    # strongly consistent, 1 eventually.
    expect(url, ranged, "strong Query of 3 x 2048 bytes", 0, 2, lambda: dynamodb.query(**query, ConsistentRead=True))
    expect(url, ranged, "eventual Query of 3 x 2048 bytes", 0, 1, lambda: dynamodb.query(**query))
    # A filter applies after the read: the same 2 RCU, though nothing is returned.
    expect(url, ranged, "strong Query filtered to nothing", 0, 2, lambda: dynamodb.query(
        **{**query, "ExpressionAttributeValues": {":q": {"S": "q"}, ":no": {"S": "no"}}},
        FilterExpression="d = :no", ConsistentRead=True))
    # A page of one item: 2048 bytes, 1 RCU strongly consistent.
    expect(url, ranged, "strong Query limited to 1 item", 0, 1, lambda: dynamodb.query(
        **query, Limit=1, ConsistentRead=True))
    # A Scan reads the same three items: 2 RCU strongly consistent.
    expect(url, ranged, "strong Scan of 3 x 2048 bytes", 0, 2, lambda: dynamodb.scan(TableName=ranged, ConsistentRead=True))

    # Every type's size, as dynamodb_items reports the table's bytes:
    #   "PK" S "k"                2 + 1                              =  3
    #   "n"  N "123.450"          1 + (5 significant digits 12345:
    #                                  ceil(5 / 2) = 3, + 1 = 4)    =  5
    #   "b"  B 3 bytes            1 + 3                              =  4
    #   "t"  BOOL                 1 + 1                              =  2
    #   "z"  NULL                 1 + 1                              =  2
    #   "l"  L [S "ab", N "7"]    1 + 3 + (1 + 2) + (1 + (1 + 1))    = 10
    #   "m"  M {"k1": S "v"}      1 + 3 + (1 + 2 + 1)                =  8
    #   "ss" SS ["a", "bc"]       2 + 1 + 2                          =  5
    #                                                         total    39 bytes, 1 WCU
    expect(url, sized, "PutItem of every type, 39 bytes", 1, 0, put(sized, {
        "PK": {"S": "k"}, "n": {"N": "123.450"}, "b": {"B": b"\x00\x01\x02"}, "t": {"BOOL": True},
        "z": {"NULL": True}, "l": {"L": [{"S": "ab"}, {"N": "7"}]}, "m": {"M": {"k1": {"S": "v"}}},
        "ss": {"SS": ["a", "bc"]},
    }))
    items = usage(url)["dynamodb_items"]
    if items.get(sized, {}).get("count") != 1 or items[sized].get("bytes") != 39:
        problems.append(f"an item of every type: expected 1 item of 39 bytes, got {items.get(sized)}")
    # The ranged table: three items of 2048 bytes.
    if items.get(ranged, {}).get("count") != 3 or items[ranged].get("bytes") != 3 * 2048:
        problems.append(f"query table: expected 3 items of 6144 bytes, got {items.get(ranged)}")

    queue = sqs.create_queue(QueueName=f"capacity-{run}")["QueueUrl"]
    sqs.send_message(QueueUrl=queue, MessageBody="one")
    sqs.send_message(QueueUrl=queue, MessageBody="two")
    cloudwatch.put_metric_data(Namespace=f"capacity-{run}", MetricData=[{"MetricName": "m", "Value": 1.0}])

    requests = usage(url)["requests"]
    dynamodb_requests = {
        # PutItem: put, grow, big3, big3 failed, big5, 3 x q, every type
        "PutItem": 9, "UpdateItem": 3, "TransactWriteItems": 2, "GetItem": 4, "BatchGetItem": 1,
        "TransactGetItems": 1, "Query": 4, "Scan": 1,
    }
    for action, n in dynamodb_requests.items():
        if requests["dynamodb"].get(action) != n:
            problems.append(f"dynamodb {action}: expected {n} requests, got {requests['dynamodb'].get(action)}")
    if requests["sqs"].get("SendMessage") != 2 or requests["sqs"].get("CreateQueue") != 1:
        problems.append(f"sqs: expected 2 SendMessage and 1 CreateQueue, got {requests['sqs']}")
    if requests["cloudwatch"].get("PutMetricData") != 1:
        problems.append(f"cloudwatch: expected 1 PutMetricData, got {requests['cloudwatch']}")

    reset(url)
    after_reset = usage(url)
    if any(after_reset["requests"].values()) or after_reset["dynamodb_capacity"]:
        problems.append(f"reset left counts: {after_reset['requests']} {after_reset['dynamodb_capacity']}")

    sqs.delete_queue(QueueUrl=queue)
    for name in (table, ranged, sized):
        dynamodb.delete_table(TableName=name)
    reset(url)
    if problems:
        sys.exit("moto's capacity account is wrong:\n  " + "\n  ".join(problems))
    print("moto capacity: DynamoDB units by item size, SQS and CloudWatch requests, reset: as documented")


if __name__ == "__main__":
    main(sys.argv[1])
