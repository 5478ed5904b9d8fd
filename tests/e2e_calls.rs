//! The Calls door end to end: `ratepool serve` in front of `ratepool sim`,
//! both real processes, called over HTTP the way an OpenAI SDK calls them
//! (the SDKs themselves drive it in `e2e_sdk.rs`).

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::pool::{CHAT_MODEL, EMBEDDING_MODEL, Pool, PoolSpec};
use common::{OrgSpec, TENANT_A_KEY, TENANT_B_KEY, http};
use serde_json::{Value, json};

fn chat_body(content: &str, max_tokens: u64) -> Value {
    json!({"model": CHAT_MODEL, "max_tokens": max_tokens, "messages": [{"role": "user", "content": content}]})
}

/// The `data:` payloads of an SSE body, in order.
fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| e.lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n"))
        .collect()
}

/// The text of every content delta of a streamed answer.
fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter(|d| d.starts_with('{'))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str().map(str::to_owned))
        .collect()
}

fn header<'a>(r: &'a reqwest::blocking::Response, name: &str) -> &'a str {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
}

fn one_org(rpm: u64, tpm: u64) -> [OrgSpec; 1] {
    [OrgSpec { name: "org-a", rpm, tpm }]
}

#[test]
fn plain_and_streamed_completions_go_through_the_pool_and_count_their_usage() {
    let orgs = [OrgSpec { name: "org-a", rpm: 600, tpm: 100_000 }, OrgSpec { name: "org-b", rpm: 400, tpm: 50_000 }];
    let pool = Pool::start(PoolSpec { orgs: &orgs, latency: (20.0, 0.5), extra: "", alpha_quota: "" });

    // n and an unknown field go to the provider as they came: two choices back.
    let mut body = chat_body("Name a lighthouse.", 30);
    body["n"] = json!(2);
    body["x_vendor_option"] = json!({"keep": true});
    let r = pool.post("chat/completions", TENANT_A_KEY, &body.to_string(), &[]);
    assert_eq!(r.status(), 200);
    assert!(["org-a", "org-b"].contains(&header(&r, "x-ratepool-org")));
    let waited: u64 = header(&r, "x-ratepool-wait-ms").parse().expect("wait in ms");
    assert!(waited < 1_000, "capacity was free: {waited} ms");
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "1000", "the pool's requests: 600 + 400");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "150000");
    let remaining: u64 = header(&r, "x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(remaining < 150_000, "the call's reservation is taken: {remaining}");
    assert!(header(&r, "x-ratelimit-reset-tokens").ends_with('s'), "a Go duration");
    assert_eq!(header(&r, "content-type"), "application/json");
    let whole: Value = r.json().unwrap();
    assert_eq!(whole["object"], "chat.completion");
    assert_eq!(whole["choices"].as_array().map(Vec::len), Some(2));
    let whole_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap();

    // The same request streamed: the same text, in chunks, without the
    // usage chunk the client did not ask for (ratepool asked for it).
    let mut streamed = chat_body("Name a lighthouse.", 30);
    streamed["stream"] = json!(true);
    let r = pool.post("chat/completions", TENANT_A_KEY, &streamed.to_string(), &[]);
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    let events = sse_data(&r.text().unwrap());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert!(events.len() > 3, "{events:?}");
    let chunks: Vec<Value> = events.iter().filter_map(|d| serde_json::from_str(d).ok()).collect();
    assert!(
        chunks.iter().all(|c| c["choices"].as_array().is_some_and(|a| !a.is_empty())),
        "no usage chunk: {events:?}"
    );
    assert_eq!(streamed_content(&events), whole["choices"][0]["message"]["content"].as_str().unwrap());

    // Asked for, the usage chunk is there, last before [DONE].
    streamed["stream_options"] = json!({"include_usage": true});
    let r = pool.post("chat/completions", TENANT_A_KEY, &streamed.to_string(), &[]);
    let events = sse_data(&r.text().unwrap());
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    let stream_tokens = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(stream_tokens > 0);

    // Every call's usage reached the metrics, the streams' from their usage chunks.
    let counted = pool.metric("ratepool_provider_tokens_total", &["kind=\"completion\""]);
    let one_choice = stream_tokens;
    assert!(counted >= (whole_tokens + 2 * one_choice) as f64, "{counted} < {whole_tokens} + 2 x {one_choice}");
    assert_eq!(pool.metric("ratepool_calls_total", &["endpoint=\"chat_completions\"", "outcome=\"ok\""]), 3.0);
    assert_eq!(pool.sim_stats()["total_calls"], 3);
}

#[test]
fn embeddings_and_models_are_served_by_the_pool() {
    let orgs = [OrgSpec { name: "org-a", rpm: 600, tpm: 10_000 }, OrgSpec { name: "org-b", rpm: 600, tpm: 10_000 }];
    let pool = Pool::start(PoolSpec { orgs: &orgs, latency: (10.0, 0.0), extra: "", alpha_quota: "" });
    let r = http().get(format!("{}/models", pool.v1())).bearer_auth(TENANT_A_KEY).send().unwrap();
    assert_eq!(r.status(), 200);
    let list: Value = r.json().unwrap();
    assert_eq!(list["object"], "list");
    let ids: Vec<&str> = list["data"].as_array().unwrap().iter().filter_map(|m| m["id"].as_str()).collect();
    assert_eq!(ids, [CHAT_MODEL, EMBEDDING_MODEL]);
    assert!(list["data"].as_array().unwrap().iter().all(|m| m["object"] == "model" && m["owned_by"] == "ratepool"));
    let r = http().get(format!("{}/models", pool.v1())).bearer_auth("not-a-tenant-key-at-all").send().unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "invalid_api_key");

    let body = json!({"model": EMBEDDING_MODEL, "input": ["a lighthouse", "a keeper"], "dimensions": 8});
    let r = pool.post("embeddings", TENANT_A_KEY, &body.to_string(), &[]);
    assert_eq!(r.status(), 200);
    // Its own limits: the embeddings model's, not the chat model's.
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "200000");
    let e: Value = r.json().unwrap();
    assert_eq!(e["object"], "list");
    assert_eq!(e["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(e["data"][1]["embedding"].as_array().map(Vec::len), Some(8));
    assert_eq!(pool.metric("ratepool_calls_total", &["endpoint=\"embeddings\"", "outcome=\"ok\""]), 1.0);
}

#[test]
fn a_call_without_capacity_in_its_wait_gets_a_429_saying_exactly_when_and_is_charged_nothing() {
    // 1000 tokens a second: spend the burst, then ask for more than is left.
    let pool =
        Pool::start(PoolSpec { orgs: &one_org(6_000, 60_000), latency: (10.0, 0.0), extra: "", alpha_quota: "" });
    let r = pool.post("chat/completions", TENANT_A_KEY, &chat_body("spend", 58_000).to_string(), &[]);
    assert_eq!(r.status(), 200);
    let acquired = pool.metric("ratepool_ledger_operations_total", &["op=\"acquire\""]);
    let calls = pool.sim_stats()["total_calls"].as_u64().unwrap();

    let big = chat_body("more", 4_000).to_string();
    let asked = Instant::now();
    let r = pool.post("chat/completions", TENANT_A_KEY, &big, &[("Ratepool-Max-Wait", "0.2")]);
    assert_eq!(r.status(), 429);
    assert!(asked.elapsed() < Duration::from_secs(2), "told at once: {:?}", asked.elapsed());
    let ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    let secs: u64 = header(&r, "retry-after").parse().unwrap();
    assert_eq!(secs, ms.div_ceil(1_000), "whole seconds, rounded up");
    assert!((1_000..6_000).contains(&ms), "about 3 s of refill: {ms} ms");
    assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
    let e: Value = r.json().unwrap();
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert!(e["error"]["message"].as_str().unwrap().contains("no capacity"), "{e}");
    // Nothing was charged or sent.
    assert_eq!(pool.metric("ratepool_ledger_operations_total", &["op=\"acquire\""]), acquired);
    assert_eq!(pool.sim_stats()["total_calls"].as_u64().unwrap(), calls);
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"no_capacity\""]), 1.0);

    // The retry time is exact: well before it there is still no room …
    std::thread::sleep(Duration::from_millis(ms.saturating_sub(900)));
    let r = pool.post("chat/completions", TENANT_A_KEY, &big, &[("Ratepool-Max-Wait", "0")]);
    assert_eq!(r.status(), 429, "a second early");
    // … and once it has passed there is, with no wait at all.
    let ms: u64 = header(&r, "retry-after-ms").parse().unwrap();
    std::thread::sleep(Duration::from_millis(ms));
    let r = pool.post("chat/completions", TENANT_A_KEY, &big, &[("Ratepool-Max-Wait", "0.05")]);
    assert_eq!(r.status(), 200, "{:?}", r.text());
    assert_eq!(pool.provider_429s(), 0, "the provider never refused a call");
}

#[test]
fn a_call_waits_for_capacity_that_comes_within_its_wait() {
    let pool =
        Pool::start(PoolSpec { orgs: &one_org(6_000, 60_000), latency: (10.0, 0.0), extra: "", alpha_quota: "" });
    let r = pool.post("chat/completions", TENANT_A_KEY, &chat_body("spend", 58_000).to_string(), &[]);
    assert_eq!(r.status(), 200);
    // About 2 s of refill needed, 10 s allowed: answered after the wait.
    let r = pool.post(
        "chat/completions",
        TENANT_A_KEY,
        &chat_body("wait", 3_000).to_string(),
        &[("Ratepool-Max-Wait", "10")],
    );
    assert_eq!(r.status(), 200);
    let waited: u64 = header(&r, "x-ratepool-wait-ms").parse().unwrap();
    assert!((500..10_000).contains(&waited), "waited {waited} ms");
    assert_eq!(pool.provider_429s(), 0);
}

#[test]
fn a_provider_refusal_is_relayed_with_its_status_and_body() {
    let pool = Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (10.0, 0.0), extra: "", alpha_quota: "" });
    // ratepool forwards `stop`; the provider allows at most 4 sequences.
    let mut body = chat_body("hi", 10);
    body["stop"] = json!(["a", "b", "c", "d", "e"]);
    let direct = http()
        .post(format!("{}/v1/chat/completions", pool.sim.url))
        .bearer_auth(common::org_key("org-a"))
        .body(body.to_string())
        .send()
        .unwrap();
    assert_eq!(direct.status(), 400);
    let direct = direct.text().unwrap();
    let r = pool.post("chat/completions", TENANT_A_KEY, &body.to_string(), &[]);
    assert_eq!(r.status(), 400);
    assert_eq!(r.text().unwrap(), direct, "the provider's body, byte for byte");
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"provider_error\""]), 1.0);
}

#[test]
fn an_org_outage_is_a_502_naming_the_org_within_the_wait() {
    let pool = Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (10.0, 0.0), extra: "", alpha_quota: "" });
    http().post(format!("{}/_sim/orgs/org-a", pool.sim.url)).json(&json!({"down": true})).send().unwrap();
    let asked = Instant::now();
    let r =
        pool.post("chat/completions", TENANT_A_KEY, &chat_body("hi", 10).to_string(), &[("Ratepool-Max-Wait", "1")]);
    // Its wait plus at most one provider timeout (20 s), far less here.
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-should-retry"), "false", "ratepool already retried within the wait");
    let e: Value = r.json().unwrap();
    let message = e["error"]["message"].as_str().unwrap();
    assert!(message.contains("org-a") && message.contains("503"), "{message}");
    assert!(pool.attempts().values().sum::<u64>() >= 2, "the router retried");
}

#[test]
fn bad_requests_are_refused_naming_the_field_and_charge_nothing() {
    let extra = "[calls]\nmax_body_bytes = 4096\n";
    let quota = "[tenants.quota]\ncalls_per_minute = 600\n";
    let pool = Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (10.0, 0.0), extra, alpha_quota: quota });
    let quota_left = || -> Value {
        http().get(format!("{}/usage", pool.v1())).bearer_auth(TENANT_A_KEY).send().unwrap().json::<Value>().unwrap()
            ["quota"]["calls_per_minute"]["remaining"]
            .clone()
    };
    let before = quota_left();
    let m = CHAT_MODEL;
    let user = json!([{"role": "user", "content": "hi"}]);
    let chat = |body: Value| ("chat/completions", body.to_string(), None);
    let embed = |body: Value| ("embeddings", body.to_string(), None);
    let with =
        |header: (&'static str, &'static str)| ("chat/completions", chat_body("hi", 5).to_string(), Some(header));
    // (request, status, the param the error names)
    let cases = [
        (("chat/completions", "{not json".to_string(), None), 400, Value::Null),
        (("chat/completions", "[1, 2]".to_string(), None), 400, Value::Null),
        (chat(json!({"messages": user})), 400, json!("model")),
        (chat(json!({"model": 5, "messages": user})), 400, json!("model")),
        (chat(json!({"model": "gpt-4o-mini-typo", "messages": user})), 400, json!("model")),
        (chat(json!({"model": m})), 400, json!("messages")),
        (chat(json!({"model": m, "messages": []})), 400, json!("messages")),
        (chat(json!({"model": m, "messages": [{"content": "x"}]})), 400, json!("messages[0].role")),
        (chat(json!({"model": m, "messages": user, "stream": "yes"})), 400, json!("stream")),
        (chat(json!({"model": m, "messages": user, "n": 0})), 400, json!("n")),
        (chat(json!({"model": m, "messages": user, "max_tokens": 0})), 400, json!("max_tokens")),
        // Larger than any org admits in a minute: a client error, caught before any charge.
        (chat(json!({"model": m, "messages": user, "max_tokens": 90_000})), 400, json!("max_tokens")),
        (
            chat(json!({"model": m, "messages": user, "max_completion_tokens": 70_000})),
            400,
            json!("max_completion_tokens"),
        ),
        (embed(json!({"model": EMBEDDING_MODEL})), 400, json!("input")),
        (embed(json!({"model": EMBEDDING_MODEL, "input": []})), 400, json!("input")),
        (with(("Ratepool-Max-Wait", "soon")), 400, json!("Ratepool-Max-Wait")),
        (with(("Idempotency-Key", "has space")), 400, json!("Idempotency-Key")),
        (("chat/completions", chat_body(&"x".repeat(5_000), 5).to_string(), None), 413, Value::Null),
    ];
    for ((path, body, header), status, param) in &cases {
        let headers: Vec<(&str, &str)> = header.iter().copied().collect();
        let r = pool.post(path, TENANT_A_KEY, body, &headers);
        assert_eq!(r.status().as_u16(), *status, "{body:.80}");
        let e: Value = r.json().unwrap();
        assert_eq!(e["error"]["param"], *param, "{body:.80} → {e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["error"]["type"].is_string(), "{e}");
    }
    let r = pool.post("chat/completions", "a-wrong-key-0123456789", &chat_body("hi", 5).to_string(), &[]);
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().unwrap()["error"]["code"], "invalid_api_key");

    // Nothing reached an org, the ledger or the tenant's quota.
    assert_eq!(pool.sim_stats()["total_calls"], 0);
    assert!(pool.attempts().is_empty());
    assert_eq!(pool.metric("ratepool_ledger_operations_total", &[]), 0.0);
    assert_eq!(quota_left(), before, "the tenant's quota is untouched");
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"invalid\""]), cases.len() as f64);
}

#[test]
fn a_durable_call_is_replayed_from_the_store_after_the_server_was_killed() {
    let mut pool =
        Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (10.0, 0.2), extra: "", alpha_quota: "" });
    let key = ("Idempotency-Key", "job-42/outline");
    let body = chat_body("Outline a film about a lighthouse.", 60).to_string();
    let r = pool.post("chat/completions", TENANT_A_KEY, &body, &[key]);
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("idempotent-replayed"));
    let first = r.text().unwrap();
    let mut streamed = serde_json::from_str::<Value>(&chat_body("Write scene 1.", 60).to_string()).unwrap();
    streamed["stream"] = json!(true);
    let skey = ("Idempotency-Key", "job-42/scene-1");
    let r = pool.post("chat/completions", TENANT_A_KEY, &streamed.to_string(), &[skey]);
    let first_stream = r.text().unwrap();
    assert!(first_stream.ends_with("data: [DONE]\n\n"));

    pool.kill_and_restart_server();

    let r = pool.post("chat/completions", TENANT_A_KEY, &body, &[key]);
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "idempotent-replayed"), "true");
    assert_eq!(header(&r, "x-ratepool-org"), "org-a");
    assert_eq!(r.text().unwrap(), first, "the stored answer, byte for byte");
    // Key order and whitespace are not part of a request's identity.
    let reordered = json!({"messages": [{"content": "Outline a film about a lighthouse.", "role": "user"}],
                           "max_tokens": 60, "model": CHAT_MODEL});
    let r = pool.post("chat/completions", TENANT_A_KEY, &serde_json::to_string_pretty(&reordered).unwrap(), &[key]);
    assert_eq!(header(&r, "idempotent-replayed"), "true");
    let r = pool.post("chat/completions", TENANT_A_KEY, &streamed.to_string(), &[skey]);
    assert_eq!(header(&r, "idempotent-replayed"), "true");
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    assert_eq!(r.text().unwrap(), first_stream, "the events as the client saw them");

    // Each reached the provider once, and the replays charged nothing.
    let attempts = pool.attempts();
    assert_eq!(attempts.get("call/alpha/job-42/outline"), Some(&1), "{attempts:?}");
    assert_eq!(attempts.get("call/alpha/job-42/scene-1"), Some(&1), "{attempts:?}");
    assert_eq!(pool.sim_stats()["total_calls"], 2);
    assert_eq!(
        pool.metric("ratepool_ledger_operations_total", &["op=\"acquire\""]),
        0.0,
        "the new process charged nothing"
    );
    assert_eq!(pool.metric("ratepool_calls_total", &["outcome=\"replayed\""]), 3.0);

    // The same key with another body is refused; another tenant's same key is its own.
    let other = chat_body("Outline a film about a lighthouse keeper.", 60).to_string();
    let r = pool.post("chat/completions", TENANT_A_KEY, &other, &[key]);
    assert_eq!(r.status(), 422);
    assert_eq!(r.json::<Value>().unwrap()["error"]["param"], "Idempotency-Key");
    let r = pool.post("chat/completions", TENANT_B_KEY, &other, &[key]);
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("idempotent-replayed"));
    assert_eq!(pool.attempts().get("call/beta/job-42/outline"), Some(&1));
}

#[test]
fn a_duplicate_that_arrives_in_flight_waits_and_gets_the_same_answer_from_one_call() {
    // A second and a half per call, so the two overlap.
    let pool =
        Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (1_500.0, 0.0), extra: "", alpha_quota: "" });
    let body = chat_body("Only once, please.", 20).to_string();
    let url = pool.server.url.clone();
    let send = |delay: u64| {
        let (url, body) = (url.clone(), body.clone());
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(delay));
            let r = http()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(TENANT_A_KEY)
                .header("Idempotency-Key", "chain-9/step-3")
                .body(body)
                .send()
                .unwrap();
            let replayed = r.headers().contains_key("idempotent-replayed");
            (r.status().as_u16(), replayed, r.text().unwrap())
        })
    };
    let (a, b) = (send(0), send(300));
    let (a, b) = (a.join().unwrap(), b.join().unwrap());
    assert_eq!((a.0, b.0), (200, 200));
    assert_eq!(a.2, b.2, "the same answer");
    assert_eq!((a.1, b.1), (false, true), "the second waited for the first");
    assert_eq!(pool.attempts().get("call/alpha/chain-9/step-3"), Some(&1));
    assert_eq!(pool.sim_stats()["total_calls"], 1);
}

#[test]
fn a_client_that_goes_away_mid_stream_cancels_the_provider_call() {
    // 50 ms a token: a 200-token answer streams for ten seconds.
    let pool = Pool::start(PoolSpec { orgs: &one_org(600, 60_000), latency: (10.0, 50.0), extra: "", alpha_quota: "" });
    let mut body = chat_body("Talk for a long time.", 200);
    body["stream"] = json!(true);
    for key in [None, Some("stream-7/long")] {
        let headers: Vec<(&str, &str)> = key.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        let cut_before = pool.sim_stats()["streams_cut"].as_u64().unwrap();
        let mut r = pool.post("chat/completions", TENANT_A_KEY, &body.to_string(), &headers);
        assert_eq!(r.status(), 200);
        let mut first = [0u8; 64];
        let n = r.read(&mut first).unwrap();
        assert!(n > 0, "the first event arrived");
        drop(r);
        // The provider's end of the call is closed too, long before it would have ended.
        pool.eventually(Duration::from_secs(3), "the provider's stream was cut", |p| {
            p.sim_stats()["streams_cut"].as_u64().unwrap() > cut_before
        });
    }
    pool.eventually(Duration::from_secs(3), "both disconnects counted", |p| {
        p.metric("ratepool_calls_total", &["outcome=\"client_closed\""]) == 2.0
    });
    // Counted as provider calls (no usage came), and the durable one's key was given back:
    // a retry calls again at once instead of waiting for the claim to lapse.
    assert_eq!(pool.metric("ratepool_provider_calls_total", &["outcome=\"ok\""]), 2.0);
    let mut short = chat_body("Talk for a long time.", 200);
    short["stream"] = json!(true);
    let asked = Instant::now();
    let r = pool.post("chat/completions", TENANT_A_KEY, &short.to_string(), &[("Idempotency-Key", "stream-7/long")]);
    assert_eq!(r.status(), 200);
    assert!(!r.headers().contains_key("idempotent-replayed"));
    drop(r);
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    assert_eq!(pool.attempts().get("call/alpha/stream-7/long"), Some(&2));
}

#[test]
fn the_api_without_a_router_answers_calls_with_a_clear_501_and_still_lists_models() {
    use tower::ServiceExt;
    // The Lambda's API state (no router) on a SQLite store.
    let dir = tempfile::tempdir().unwrap();
    let toml = format!(
        "[storage]\npath = \"{}\"\n[[orgs]]\nname = \"org-a\"\napi_key_env = \"ORG_A_KEY\"\n\
         [orgs.models.\"{CHAT_MODEL}\"]\nrpm = 10\ntpm = 1000\n[[tenants]]\nname = \"alpha\"\napi_key_env = \"TENANT_A_KEY\"\n",
        dir.path().join("db.sqlite").display()
    );
    let cfg = ratepool::config::Config::parse(&toml).unwrap();
    let env = std::collections::BTreeMap::from([("TENANT_A_KEY".to_string(), TENANT_A_KEY.to_string())]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let app =
        rt.block_on(async { ratepool::api::router(ratepool::serve::lambda_state(&cfg, Some(&env)).await.unwrap()) });
    let send = |method: &str, path: &str, body: String| {
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {TENANT_A_KEY}"))
            .body(axum::body::Body::from(body))
            .unwrap();
        rt.block_on(async {
            let resp = app.clone().oneshot(req).await.unwrap();
            let status = resp.status().as_u16();
            let should_retry = resp.headers().get("x-should-retry").map(|v| v.to_str().unwrap().to_owned());
            let bytes = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
            (status, should_retry, serde_json::from_slice::<Value>(&bytes).unwrap())
        })
    };
    let (status, should_retry, body) = send("POST", "/v1/chat/completions", chat_body("hi", 5).to_string());
    assert_eq!(status, 501);
    assert_eq!(should_retry.as_deref(), Some("false"));
    assert_eq!(body["error"]["code"], "calls_not_served");
    assert!(body["error"]["message"].as_str().unwrap().contains("ratepool serve"), "{body}");
    let (status, _, _) = send("POST", "/v1/embeddings", json!({"model": EMBEDDING_MODEL, "input": "x"}).to_string());
    assert_eq!(status, 501);
    let (status, _, body) = send("GET", "/v1/models", String::new());
    assert_eq!(status, 200);
    assert_eq!(body["data"][0]["id"], CHAT_MODEL);
}
