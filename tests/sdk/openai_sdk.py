#!/usr/bin/env python3
"""Drives ratepool's OpenAI-compatible endpoint with the official `openai`
Python SDK, unmodified: only `base_url` and `api_key` point it at the pool.

Run by tests/e2e_sdk.rs with the test venv's Python:

    RATEPOOL_BASE_URL=http://HOST/v1 RATEPOOL_API_KEY=KEY python openai_sdk.py SCENARIO [ARGS]

Scenarios:
    basic            completions (plain, streamed, with usage), embeddings,
                     models, and the SDK's error classes
    retry            spends the org's burst, then makes a call with a short
                     Ratepool-Max-Wait that gets a 429; the SDK's own retry
                     must succeed after the retry-after it was given
    chain JOB STEPS  a chain of STEPS calls, each fed the answer before it,
                     each durable with the key JOB/step-N; prints one JSON
                     line per step: {"step", "replayed", "content"}

Any mismatch exits non-zero with a message on stderr.
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

CHAT = "gpt-4o-mini"
EMBED = "text-embedding-3-small"


def fail(message):
    print(f"openai_sdk.py: {message}", file=sys.stderr)
    sys.exit(1)


def check(condition, message):
    if not condition:
        fail(message)


def client(**kwargs):
    return OpenAI(base_url=os.environ["RATEPOOL_BASE_URL"], api_key=os.environ["RATEPOOL_API_KEY"], **kwargs)


def user(text):
    return [{"role": "user", "content": text}]


def basic():
    c = client(max_retries=0)
    ids = [m.id for m in c.models.list()]
    check(CHAT in ids and EMBED in ids, f"models: {ids}")

    raw = c.chat.completions.with_raw_response.create(model=CHAT, messages=user("Name a lighthouse."), max_tokens=30)
    check(raw.headers.get("x-ratepool-org"), "no x-ratepool-org header")
    check(raw.headers.get("x-ratelimit-remaining-tokens"), "no x-ratelimit-remaining-tokens header")
    completion = raw.parse()
    text = completion.choices[0].message.content
    check(text, f"empty completion: {completion}")
    check(completion.usage.completion_tokens > 0, f"no usage: {completion.usage}")

    chunks = list(c.chat.completions.create(model=CHAT, messages=user("Name a lighthouse."), max_tokens=30, stream=True))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    check(streamed == text, f"streamed {streamed!r} != whole {text!r}")
    check(all(ch.usage is None for ch in chunks), "a usage chunk the client did not ask for")

    chunks = list(
        c.chat.completions.create(
            model=CHAT,
            messages=user("Name a lighthouse."),
            max_tokens=30,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, "no usage chunk when asked")

    emb = c.embeddings.create(model=EMBED, input=["a lighthouse", "a keeper"])
    check(len(emb.data) == 2 and len(emb.data[0].embedding) > 0, f"embeddings: {emb}")

    try:
        c.chat.completions.create(model="gpt-4o-mini-typo", messages=user("hi"))
        fail("an unknown model was accepted")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and e.param == "model", f"unknown model: {e.status_code} {e.param} {e}")
    try:
        c.chat.completions.create(model=CHAT, messages=[])
        fail("empty messages were accepted")
    except openai.BadRequestError as e:
        check(e.param == "messages", f"empty messages: param {e.param}")
    try:
        OpenAI(base_url=os.environ["RATEPOOL_BASE_URL"], api_key="not-a-tenant-key-0000").models.list()
        fail("a wrong key was accepted")
    except openai.AuthenticationError as e:
        check(e.code == "invalid_api_key", f"wrong key: code {e.code}")
    print(json.dumps({"ok": True}))


def retry():
    c = client(max_retries=0)
    c.chat.completions.create(model=CHAT, messages=user("spend the burst"), max_tokens=5_800)
    # The pool has no room for this one for a few seconds; 0.2 s of waiting
    # is not enough, so ratepool answers 429 and the SDK retries after it.
    patient = client(max_retries=3, default_headers={"Ratepool-Max-Wait": "0.2"})
    started = time.monotonic()
    raw = patient.chat.completions.with_raw_response.create(model=CHAT, messages=user("then this"), max_tokens=400)
    elapsed = time.monotonic() - started
    completion = raw.parse()
    check(completion.choices[0].message.content, "empty completion after the retry")
    check(raw.retries_taken >= 1, f"the SDK did not retry (retries_taken={raw.retries_taken})")
    print(json.dumps({"retries": raw.retries_taken, "elapsed_s": elapsed}))


def chain(job, steps):
    c = client(max_retries=2)
    previous = "A lighthouse keeper finds a message in a bottle."
    for step in range(1, steps + 1):
        raw = c.chat.completions.with_raw_response.create(
            model=CHAT,
            messages=user(f"Continue the story: {previous}"),
            max_tokens=40,
            extra_headers={"Idempotency-Key": f"{job}/step-{step}"},
        )
        content = raw.parse().choices[0].message.content
        check(content, f"step {step}: empty answer")
        replayed = raw.headers.get("idempotent-replayed") == "true"
        print(json.dumps({"step": step, "replayed": replayed, "content": content}), flush=True)
        previous = content


def main():
    if len(sys.argv) < 2:
        fail("usage: openai_sdk.py basic | retry | chain JOB STEPS")
    scenario = sys.argv[1]
    if scenario == "basic":
        basic()
    elif scenario == "retry":
        retry()
    elif scenario == "chain" and len(sys.argv) == 4:
        chain(sys.argv[2], int(sys.argv[3]))
    else:
        fail(f"unknown scenario {sys.argv[1:]}")


if __name__ == "__main__":
    try:
        main()
    except openai.APIError as e:
        fail(f"{type(e).__name__}: {e}")
