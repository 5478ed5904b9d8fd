//! End-to-end tests of the simulator over real HTTP: each test binds its own
//! port, drives the sim with reqwest, and reads `/_sim/stats`. Time is a
//! `ManualClock` and latency is scaled to zero, so nothing sleeps.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use super::*;
use crate::domain::ManualClock;

const T0: i64 = 1_700_000_000_000_000;

const CONFIG: &str = r#"
[latency]
time_scale = 0

[[orgs]]
name = "org-a"
api_key = "sk-a"
models."gpt-4o-mini" = { rpm = 3, tpm = 1000 }

[[orgs]]
name = "org-b"
api_key = "sk-b"
models."gpt-4o-mini" = { rpm = 100, tpm = 100000 }
"#;

struct TestSim {
    base: String,
    http: reqwest::Client,
    clock: Arc<ManualClock>,
    sim: Simulator,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn spawn(toml: &str) -> TestSim {
    let config = SimConfig::from_toml(toml).unwrap();
    let clock = Arc::new(ManualClock::new(T0));
    let sim = Simulator::new(config, clock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(listener, sim.clone(), async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    TestSim { base, http, clock, sim, stop: Some(stop), server }
}

fn request(content: &str, max_tokens: u64) -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0.3,
        "user": "ignored",
    })
}

impl TestSim {
    async fn chat(&self, key: &str, body: &Value) -> reqwest::Result<reqwest::Response> {
        self.chat_as(key, body, None).await
    }

    async fn chat_as(&self, key: &str, body: &Value, id: Option<&str>) -> reqwest::Result<reqwest::Response> {
        let mut req = self.http.post(format!("{}/v1/chat/completions", self.base)).bearer_auth(key).json(body);
        if let Some(id) = id {
            req = req.header("X-Client-Request-Id", id);
        }
        req.send().await
    }

    async fn control(&self, path: &str, body: Value) -> reqwest::Response {
        self.http.post(format!("{}{path}", self.base)).json(&body).send().await.unwrap()
    }

    async fn stats(&self) -> SimStats {
        let s: SimStats =
            self.http.get(format!("{}/_sim/stats", self.base)).send().await.unwrap().json().await.unwrap();
        assert_eq!(s, self.sim.stats(), "the route and the method must agree");
        s
    }

    async fn org(&self, name: &str) -> OrgStats {
        self.stats().await.orgs[name].clone()
    }
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("missing header {name}"))
}

#[tokio::test]
async fn answer_carries_usage_and_openai_rate_limit_headers() {
    let t = spawn(CONFIG).await;
    // "Hello, world" is 12 chars = 3 tokens; cost 3 + 50.
    let r = t.chat("sk-b", &request("Hello, world", 50)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "100");
    assert_eq!(header(&r, "x-ratelimit-limit-tokens"), "100000");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "99");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "99947");
    // One request of 100/min refills in 600 ms; 53 tokens of 100k/min in 31.8 ms.
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "600ms");
    assert_eq!(header(&r, "x-ratelimit-reset-tokens"), "32ms");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o-mini");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["created"], T0 / 1_000_000);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    let usage = &body["usage"];
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert_eq!(usage["prompt_tokens"], 3);
    assert!((25..=50).contains(&completion), "{completion}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), 3 + completion);
    let finish = body["choices"][0]["finish_reason"].as_str().unwrap();
    assert_eq!(finish == "length", completion == 50);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(text.len() as u64 >= completion * 4, "{text}");

    let b = t.org("org-b").await;
    assert_eq!((b.accepted_calls, b.accepted_prompt_tokens, b.accepted_completion_tokens), (1, 3, completion));
    assert_eq!(b.charged_tokens, 53);
    assert_eq!(t.org("org-a").await.accepted_calls, 0);
}

#[tokio::test]
async fn answers_depend_only_on_the_request() {
    let t = spawn(CONFIG).await;
    let req = request("Tell me about rivers.", 40);
    let first: Value = t.chat("sk-a", &req).await.unwrap().json().await.unwrap();
    t.clock.advance(Duration::from_secs(30));
    let again: Value = t.chat("sk-a", &req).await.unwrap().json().await.unwrap();
    let other_org: Value = t
        .http
        .post(format!("{}/chat/completions", t.base))
        .bearer_auth("sk-b")
        .json(&req)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    for other in [&again, &other_org] {
        assert_eq!(first["choices"], other["choices"]);
        assert_eq!(first["usage"], other["usage"]);
    }
    let different: Value = t.chat("sk-b", &request("Tell me about lakes.", 40)).await.unwrap().json().await.unwrap();
    assert_ne!(first["choices"][0]["message"]["content"], different["choices"][0]["message"]["content"]);
}

#[tokio::test]
async fn exceeding_rpm_is_a_requests_429_that_charges_nothing() {
    let t = spawn(CONFIG).await;
    for i in 0..3 {
        let r = t.chat("sk-a", &request(&format!("call {i}"), 10)).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
    let before = t.org("org-a").await;
    let r = t.chat("sk-a", &request("one too many", 10)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    // One request of 3/min comes back in 20 s.
    assert_eq!(header(&r, "retry-after-ms"), "20000");
    assert_eq!(header(&r, "retry-after"), "20");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    assert_eq!(header(&r, "x-ratelimit-reset-requests"), "1m0s");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "requests");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["param"], Value::Null);
    assert_eq!(
        body["error"]["message"],
        "Rate limit reached for gpt-4o-mini in organization org-a on requests per min (RPM): \
         Limit 3, Used 3, Requested 1. Please try again in 20s."
    );
    let after = t.org("org-a").await;
    assert_eq!(after.charged_tokens, before.charged_tokens);
    assert_eq!(after.accepted_calls, 3);
    assert_eq!((after.rate_limited_requests, after.rate_limited_tokens), (1, 0));

    // The refused call took nothing, so exactly 20 s later one call fits.
    t.clock.advance(Duration::from_millis(19_999));
    assert_eq!(t.chat("sk-a", &request("early", 10)).await.unwrap().status(), StatusCode::TOO_MANY_REQUESTS);
    t.clock.advance(Duration::from_millis(1));
    assert_eq!(t.chat("sk-a", &request("on time", 10)).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn exceeding_tpm_quotes_openais_numbers() {
    let t = spawn(CONFIG).await;
    // "abcd" is one token: costs 1 + 989 = 990, then 1 + 119 = 120.
    assert_eq!(t.chat("sk-a", &request("abcd", 989)).await.unwrap().status(), StatusCode::OK);
    let r = t.chat("sk-a", &request("abcd", 119)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(header(&r, "retry-after-ms"), "6600");
    assert_eq!(header(&r, "retry-after"), "7");
    assert_eq!(header(&r, "x-ratelimit-remaining-tokens"), "10");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": "Rate limit reached for gpt-4o-mini in organization org-a on tokens per min (TPM): \
                        Limit 1000, Used 990, Requested 120. Please try again in 6.6s.",
            "type": "tokens",
            "param": null,
            "code": "rate_limit_exceeded",
        }})
    );
    assert_eq!(t.org("org-a").await.rate_limited_tokens, 1);
    assert_eq!(t.org("org-a").await.charged_tokens, 990);
    t.clock.advance(Duration::from_millis(6_600));
    assert_eq!(t.chat("sk-a", &request("abcd", 119)).await.unwrap().status(), StatusCode::OK);

    // More than a whole minute's tokens can never fit: no retry hint.
    let r = t.chat("sk-a", &request("abcd", 1_000)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("retry-after-ms").is_none());
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Request too large"), "{body}");
}

#[tokio::test]
async fn insufficient_quota_is_openais_billing_429() {
    let t = spawn(CONFIG).await;
    let r = t.control("/_sim/orgs/org-b", json!({"insufficient_quota": true})).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = t.chat("sk-b", &request("hi", 10)).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(r.headers().get("x-ratelimit-remaining-tokens").is_some());
    assert!(r.headers().get("retry-after-ms").is_none());
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        json!({"error": {
            "message": "You exceeded your current quota, please check your plan and billing details.",
            "type": "insufficient_quota",
            "param": null,
            "code": "insufficient_quota",
        }})
    );
    let b = t.org("org-b").await;
    assert_eq!((b.insufficient_quota, b.accepted_calls, b.charged_tokens), (1, 0, 0));

    let r = t.control("/_sim/orgs/org-b", json!({"insufficient_quota": false})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["insufficient_quota"], false);
    assert_eq!(t.chat("sk-b", &request("hi", 10)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(t.control("/_sim/orgs/org-zz", json!({"down": true})).await.status(), StatusCode::NOT_FOUND);
    assert_eq!(t.control("/_sim/orgs/org-b", json!({"dwn": true})).await.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_slowed_org_answers_503_slow_down_above_its_rate() {
    let t = spawn(CONFIG).await;
    let r = t.control("/_sim/orgs/org-b", json!({"slow_down_rpm": 60})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["slow_down_rpm"], 60);
    // 60 a minute with a second of burst: one now, the next a second later.
    assert_eq!(t.chat_as("sk-b", &request("hi", 10), Some("j/s1")).await.unwrap().status(), StatusCode::OK);
    let r = t.chat_as("sk-b", &request("hi", 10), Some("j/s1")).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["error"]["type"].as_str(), body["error"]["code"].as_str()),
        (Some("slow_down"), Some("slow_down"))
    );
    assert!(body["error"]["message"].as_str().unwrap().starts_with("Slow Down"), "{body}");
    t.clock.advance(Duration::from_secs(1));
    assert_eq!(t.chat_as("sk-b", &request("hi", 10), Some("j/s1")).await.unwrap().status(), StatusCode::OK);
    let b = t.org("org-b").await;
    assert_eq!((b.slowed_down, b.accepted_calls), (1, 2));
    // Every request is an attempt; only admitted ones are accepted.
    let attempts: Value = t.http.get(format!("{}/_sim/attempts", t.base)).send().await.unwrap().json().await.unwrap();
    let accepted: Value = t.http.get(format!("{}/_sim/requests", t.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!((attempts["j/s1"].as_u64(), accepted["j/s1"].as_u64()), (Some(3), Some(2)));
    // Leaving the field out changes nothing; null ends the slow-down.
    let r = t.control("/_sim/orgs/org-b", json!({"down": false})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["slow_down_rpm"], 60);
    let r = t.control("/_sim/orgs/org-b", json!({"slow_down_rpm": null})).await;
    assert_eq!(r.json::<Value>().await.unwrap()["slow_down_rpm"], Value::Null);
    for _ in 0..5 {
        assert_eq!(t.chat("sk-b", &request("hi", 10)).await.unwrap().status(), StatusCode::OK);
    }
}

#[tokio::test]
async fn a_down_org_answers_503_until_it_is_back() {
    let t = spawn(CONFIG).await;
    t.control("/_sim/orgs/org-a", json!({"down": true})).await;
    let r = t.chat("sk-a", &request("hi", 10)).await.unwrap();
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "server_error");
    // The model check comes first.
    let mut unknown = request("hi", 10);
    unknown["model"] = json!("gpt-9");
    assert_eq!(t.chat("sk-a", &unknown).await.unwrap().status(), StatusCode::NOT_FOUND);
    let a = t.org("org-a").await;
    assert_eq!((a.unavailable, a.charged_tokens), (1, 0));
    t.control("/_sim/orgs/org-a", json!({"down": false})).await;
    assert_eq!(t.chat("sk-a", &request("hi", 10)).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn auth_parse_and_model_errors_look_like_openai() {
    let t = spawn(CONFIG).await;
    let url = format!("{}/v1/chat/completions", t.base);
    let r = t.http.post(&url).json(&request("hi", 10)).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = t.chat("sk-wrong", &request("hi", 10)).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["param"], Value::Null);
    assert!(!body.to_string().contains("sk-wrong"), "the key must not be echoed");

    let r = t.http.post(&url).bearer_auth("sk-a").body("{not json").send().await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "invalid_request_error");
    let r = t.chat("sk-a", &json!({"model": "gpt-4o-mini"})).await.unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["param"], "messages");

    let mut unknown = request("hi", 10);
    unknown["model"] = json!("gpt-9");
    let r = t.chat("sk-a", &unknown).await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none(), "no bucket to report");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    let s = t.stats().await;
    assert_eq!(s.total_calls, 5);
    assert_eq!(s.orgs["org-a"].accepted_calls, 0);
}

#[tokio::test]
async fn a_dropped_connection_is_a_client_error_not_a_response() {
    let t = spawn(CONFIG).await;
    let r = t.control("/_sim/faults", json!({"drop_rate": 1.0})).await;
    assert_eq!(r.json::<FaultConfig>().await.unwrap().drop_rate, 1.0);
    let err = t.chat("sk-b", &request("hi", 10)).await.expect_err("the connection should be dropped");
    assert!(!err.is_status() && !err.is_decode(), "{err:?}");
    // On the wire: not one byte of a response before the close.
    let body = request("hi", 10).to_string();
    let mut raw = tokio::net::TcpStream::connect(t.base.trim_start_matches("http://")).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: sim\r\nauthorization: Bearer sk-b\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut raw, head.as_bytes()).await.unwrap();
    let mut received = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut raw, &mut received).await;
    assert!(received.is_empty(), "{}", String::from_utf8_lossy(&received));
    let b = t.org("org-b").await;
    assert_eq!((b.dropped, b.accepted_calls, b.charged_tokens), (2, 0, 0));
    // The server itself is fine afterwards.
    t.control("/_sim/faults", json!({"drop_rate": 0.0})).await;
    assert_eq!(t.chat("sk-b", &request("hi", 10)).await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn injected_server_errors_charge_nothing() {
    let t = spawn(CONFIG).await;
    t.control("/_sim/faults", json!({"server_error_rate": 1.0})).await;
    for _ in 0..10 {
        let r = t.chat("sk-b", &request("hi", 10)).await.unwrap();
        assert!(
            [StatusCode::INTERNAL_SERVER_ERROR, StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE]
                .contains(&r.status()),
            "{}",
            r.status()
        );
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["type"], "server_error");
    }
    let b = t.org("org-b").await;
    assert_eq!((b.server_errors, b.accepted_calls, b.charged_tokens), (10, 0, 0));
    let r = t.control("/_sim/faults", json!({"server_error_rate": 2.0})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = t.control("/_sim/faults", json!({"surprise": 1})).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn a_stalled_call_hangs_then_answers() {
    let t = spawn(CONFIG).await;
    t.control("/_sim/faults", json!({"stall_rate": 1.0, "stall_ms": 150})).await;
    let started = Instant::now();
    let r = t.chat("sk-b", &request("hi", 10)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(150));
    let b = t.org("org-b").await;
    assert_eq!((b.stalled, b.accepted_calls), (1, 1));
}

#[tokio::test]
async fn shutdown_cuts_off_stalled_calls() {
    let mut t = spawn(CONFIG).await;
    t.control("/_sim/faults", json!({"stall_rate": 1.0, "stall_ms": 60_000})).await;
    let (http, url) = (t.http.clone(), format!("{}/v1/chat/completions", t.base));
    let pending = tokio::spawn(async move { http.post(url).bearer_auth("sk-b").json(&request("hi", 10)).send().await });
    while t.sim.stats().orgs["org-b"].stalled == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.stop.take().unwrap().send(()).unwrap();
    let served = tokio::time::timeout(Duration::from_secs(5), &mut t.server).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
    assert!(pending.await.unwrap().is_err());
}

#[tokio::test]
async fn accepted_calls_are_counted_per_request_id() {
    let t = spawn(CONFIG).await;
    let req = request("hi", 10);
    for _ in 0..2 {
        t.chat_as("sk-b", &req, Some("job-1/step-a")).await.unwrap();
    }
    t.chat_as("sk-b", &req, Some("job-1/step-b")).await.unwrap();
    // Without the header the body's hash is the id.
    t.chat("sk-b", &request("x", 10)).await.unwrap();
    t.chat("sk-b", &request("x", 10)).await.unwrap();
    // Refused calls are not accepted.
    for i in 0..4 {
        t.chat_as("sk-a", &req, Some(&format!("burst-{i}"))).await.unwrap();
    }
    let s = t.stats().await;
    assert_eq!(s.total_calls, 9);
    assert_eq!(s.distinct_requests, 2 + 1 + 3);
    assert_eq!(s.duplicate_requests, 2);
    assert_eq!(s.requests_accepted_more_than_once[0], "job-1/step-a");
    let counts: BTreeMap<String, u64> =
        t.http.get(format!("{}/_sim/requests", t.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(counts["job-1/step-a"], 2);
    assert_eq!(counts["job-1/step-b"], 1);
    assert!(!counts.contains_key("burst-3"));
    assert_eq!(counts.values().filter(|n| **n == 2).count(), 2);
}

#[tokio::test]
async fn peak_60s_tracks_the_busiest_minute() {
    let t = spawn(CONFIG).await;
    // Each call costs 1 + 99 = 100 tokens.
    let req = request("abcd", 99);
    for _ in 0..5 {
        assert_eq!(t.chat("sk-b", &req).await.unwrap().status(), StatusCode::OK);
    }
    t.clock.advance(Duration::from_secs(30));
    for _ in 0..5 {
        t.chat("sk-b", &req).await.unwrap();
    }
    // At +70 s the first five have left the window; the peak stays at ten.
    t.clock.advance(Duration::from_secs(40));
    for _ in 0..2 {
        t.chat("sk-b", &req).await.unwrap();
    }
    let m = &t.org("org-b").await.models["gpt-4o-mini"];
    assert_eq!((m.peak_60s_requests, m.peak_60s_tokens), (10, 1_000));
    assert_eq!((m.rpm, m.tpm, m.window_bound_requests, m.window_bound_tokens), (100, 100_000, 200, 200_000));
    // A burst of the whole minute's allowance at once is legitimate.
    t.clock.advance(Duration::from_secs(120));
    let mut admitted = 0;
    while t.chat("sk-a", &request("", 1)).await.unwrap().status() == StatusCode::OK {
        admitted += 1;
    }
    assert_eq!(admitted, 3);
    assert_eq!(t.org("org-a").await.models["gpt-4o-mini"].peak_60s_requests, 3);
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_owned).collect()
}

#[tokio::test]
async fn a_streamed_answer_is_the_same_answer_in_chunks() {
    let t = spawn(CONFIG).await;
    let whole: Value = t.chat("sk-b", &request("Tell me about rivers.", 40)).await.unwrap().json().await.unwrap();
    for include_usage in [false, true] {
        let mut req = request("Tell me about rivers.", 40);
        req["stream"] = json!(true);
        if include_usage {
            req["stream_options"] = json!({"include_usage": true});
        }
        let r = t.chat("sk-b", &req).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), "text/event-stream");
        assert!(r.headers().contains_key("x-ratelimit-remaining-tokens"));
        let events = sse_events(&r.text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
        assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == whole["id"]));
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String =
            chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
        assert_eq!(text, whole["choices"][0]["message"]["content"].as_str().unwrap());
        let finish: Vec<&Value> =
            chunks.iter().map(|c| &c["choices"][0]["finish_reason"]).filter(|f| !f.is_null()).collect();
        assert_eq!(finish, vec![&whole["choices"][0]["finish_reason"]]);
        let usage: Vec<&Value> = chunks.iter().filter(|c| c["choices"] == json!([])).map(|c| &c["usage"]).collect();
        if include_usage {
            assert_eq!(usage, vec![&whole["usage"]], "one usage chunk, last");
            assert!(chunks[..chunks.len() - 1].iter().all(|c| c["usage"].is_null()));
        } else {
            assert!(usage.is_empty() && chunks.iter().all(|c| c.get("usage").is_none()));
        }
    }
}

#[tokio::test]
async fn n_choices_are_answered_and_charged() {
    let t = spawn(CONFIG).await;
    let mut req = request("abcd", 10);
    req["n"] = json!(3);
    let body: Value = t.chat("sk-b", &req).await.unwrap().json().await.unwrap();
    let choices = body["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    assert_eq!(choices.iter().map(|c| c["index"].as_u64().unwrap()).collect::<Vec<_>>(), vec![0, 1, 2]);
    // 1 prompt token + 3 × 10 reserved.
    assert_eq!(t.org("org-b").await.charged_tokens, 31);
    req["n"] = json!(0);
    let e: Value = t.chat("sk-b", &req).await.unwrap().json().await.unwrap();
    assert_eq!(e["error"]["param"], "n");
}

#[tokio::test]
async fn embeddings_are_pooled_under_the_models_limits() {
    let toml = format!("{CONFIG}models.\"text-embedding-3-small\" = {{ rpm = 2, tpm = 1000 }}\n");
    let t = spawn(&toml).await;
    let embed = |input: Value| {
        t.http
            .post(format!("{}/v1/embeddings", t.base))
            .bearer_auth("sk-b")
            .json(&json!({"model": "text-embedding-3-small", "input": input, "dimensions": 8}))
            .send()
    };
    let r = embed(json!(["abcd", "abcdefgh"])).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(r.headers().contains_key("x-ratelimit-remaining-requests"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 8);
    // 12 characters / 4 = 3 tokens; no completion.
    assert_eq!(body["usage"], json!({"prompt_tokens": 3, "total_tokens": 3}));
    assert_eq!(embed(json!([1, 2, 3])).await.unwrap().status(), StatusCode::OK);
    let third = embed(json!("x")).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS, "rpm 2");
    let bad: Value = embed(json!([])).await.unwrap().json().await.unwrap();
    assert_eq!(bad["error"]["param"], "input");
    let m = &t.org("org-b").await.models["text-embedding-3-small"];
    assert_eq!(m.peak_60s_requests, 2);
}

#[tokio::test]
async fn models_lists_what_the_keys_org_serves() {
    let toml = format!("{CONFIG}models.\"text-embedding-3-small\" = {{ rpm = 2, tpm = 1000 }}\n");
    let t = spawn(&toml).await;
    let list = |key: &str| t.http.get(format!("{}/v1/models", t.base)).bearer_auth(key).send();
    let b: Value = list("sk-b").await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = b["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, vec!["gpt-4o-mini", "text-embedding-3-small"]);
    assert_eq!(b["data"][0]["owned_by"], "org-b");
    assert_eq!(list("sk-nope").await.unwrap().status(), StatusCode::UNAUTHORIZED);
}
