//! Bad input: malformed and hostile specs and requests each get the right
//! 4xx naming the field, and leave the store exactly as it was.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn spec_with(f: impl FnOnce(&mut Value)) -> String {
    let mut v = json!({
        "name": "t",
        "inputs": {"topic": "owls"},
        "defaults": {"model": "gpt-4o-mini", "max_tokens": 50},
        "steps": [
            {"id": "a", "messages": [{"role": "user", "content": "About {{inputs.topic}}"}]},
            {"id": "b", "messages": [{"role": "user", "content": "Shorten: {{steps.a.output}}"}]}
        ]
    });
    f(&mut v);
    v.to_string()
}

fn counts(db: &std::path::Path) -> (i64, i64, i64) {
    let c = rusqlite::Connection::open(db).unwrap();
    let one = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
    (one("SELECT COUNT(*) FROM jobs"), one("SELECT COUNT(*) FROM queue"), one("SELECT COUNT(*) FROM checkpoints"))
}

#[test]
fn malformed_and_hostile_requests_get_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000, tpm: 10_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (0.0, 0.0, 0.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let db = dir.path().join("ratepool.db");
    let url = format!("{}/v1/jobs", server.url);
    let big = "x".repeat(10 * 1024 * 1024);
    let many_steps: Vec<Value> =
        (0..501).map(|i| json!({"id": format!("s{i}"), "messages": [{"role": "user", "content": "hi"}]})).collect();

    // (case, body, expected status, expected field prefix)
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not json", "{\"name\": ".into(), 400, "body"),
        ("empty body", String::new(), 400, "body"),
        ("json array", "[1,2]".into(), 400, "body"),
        (
            "missing name",
            spec_with(|v| {
                v.as_object_mut().unwrap().remove("name");
            }),
            400,
            "name",
        ),
        ("name wrong type", spec_with(|v| v["name"] = json!(7)), 400, "name"),
        ("no steps", spec_with(|v| v["steps"] = json!([])), 400, "steps"),
        ("too many steps", spec_with(|v| v["steps"] = json!(many_steps)), 400, "steps"),
        ("duplicate ids", spec_with(|v| v["steps"][1]["id"] = json!("a")), 400, "steps[1].id"),
        ("bad step id", spec_with(|v| v["steps"][0]["id"] = json!("../etc")), 400, "steps[0].id"),
        ("cycle", spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{steps.b.output}}")), 400, "steps["),
        (
            "self reference",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{steps.a.output}}")),
            400,
            "steps[0]",
        ),
        (
            "unknown step ref",
            spec_with(|v| v["steps"][1]["messages"][0]["content"] = json!("{{steps.zzz.output}}")),
            400,
            "steps[1].messages[0].content",
        ),
        (
            "unknown input",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{inputs.nope}}")),
            400,
            "steps[0].messages[0].content",
        ),
        (
            "unclosed template",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{inputs.topic")),
            400,
            "steps[0].messages[0].content",
        ),
        (
            "bad placeholder",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{env.HOME}}")),
            400,
            "steps[0].messages[0].content",
        ),
        (
            "unknown depends_on",
            spec_with(|v| v["steps"][0]["depends_on"] = json!(["ghost"])),
            400,
            "steps[0].depends_on",
        ),
        ("unknown model", spec_with(|v| v["steps"][0]["model"] = json!("gpt-9")), 400, "steps[0].model"),
        (
            "max_tokens wrong type",
            spec_with(|v| v["steps"][0]["max_tokens"] = json!("lots")),
            400,
            "steps[0].max_tokens",
        ),
        ("max_tokens zero", spec_with(|v| v["steps"][0]["max_tokens"] = json!(0)), 400, "steps[0].max_tokens"),
        (
            "temperature out of range",
            spec_with(|v| v["steps"][0]["temperature"] = json!(7.5)),
            400,
            "steps[0].temperature",
        ),
        (
            "bad role",
            spec_with(|v| v["steps"][0]["messages"][0]["role"] = json!("wizard")),
            400,
            "steps[0].messages[0].role",
        ),
        ("no messages", spec_with(|v| v["steps"][0]["messages"] = json!([])), 400, "steps[0].messages"),
        ("unknown field", spec_with(|v| v["shell"] = json!("rm -rf /")), 400, "shell"),
        ("input wrong type", spec_with(|v| v["inputs"]["topic"] = json!({"nested": 1})), 400, "inputs"),
        ("10 MB body", spec_with(|v| v["inputs"]["topic"] = json!(big)), 413, "body"),
        // The per-request limits behind the body limit: template size,
        // messages per step, number and size of inputs.
        (
            "template over 64 KiB",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{steps.b.output}}".repeat(4000))),
            400,
            "steps[0].messages[0].content",
        ),
        (
            "33 messages",
            spec_with(|v| v["steps"][0]["messages"] = json!(vec![json!({"role": "user", "content": "hi"}); 33])),
            400,
            "steps[0].messages",
        ),
        (
            "65 inputs",
            spec_with(|v| {
                for i in 0..65 {
                    v["inputs"][format!("i{i}")] = json!("x");
                }
            }),
            400,
            "inputs",
        ),
        ("input over 256 KiB", spec_with(|v| v["inputs"]["topic"] = json!("x".repeat(300 << 10))), 400, "inputs.topic"),
        // Request fields and references of steps that speak the whole API.
        (
            "schema not an object",
            spec_with(|v| {
                v["steps"][0]["response_format"] =
                    json!({"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}})
            }),
            400,
            "steps[0].response_format.json_schema.schema",
        ),
        ("stream on a step", spec_with(|v| v["steps"][0]["stream"] = json!(true)), 400, "steps[0].stream"),
        (
            "tool_choice without that tool",
            spec_with(|v| {
                v["steps"][0]["tools"] = json!([{"type": "function", "function": {"name": "a"}}]);
                v["steps"][0]["tool_choice"] = json!({"type": "function", "function": {"name": "b"}});
            }),
            400,
            "steps[0].tool_choice",
        ),
        (
            "item outside a fan-out",
            spec_with(|v| v["steps"][0]["messages"][0]["content"] = json!("{{item.x}}")),
            400,
            "steps[0].messages[0].content",
        ),
        (
            "fan-out over text",
            spec_with(|v| v["steps"][1]["for_each"] = json!("steps.a.output")),
            400,
            "steps[1].for_each",
        ),
        (
            "extra repeating a field",
            spec_with(|v| v["steps"][0]["extra"] = json!({"seed": 1})),
            400,
            "steps[0].extra.seed",
        ),
    ];
    assert!(cases.len() >= 20);
    for (name, body, want_status, want_field) in &cases {
        let r = http().post(&url).bearer_auth(TENANT_A_KEY).body(body.clone()).send().unwrap();
        let status = r.status().as_u16();
        let v: Value = r.json().unwrap_or(Value::Null);
        assert_eq!(status, *want_status, "case {name:?}: {v}");
        let field = v["error"]["field"].as_str().unwrap_or("");
        assert!(field.starts_with(want_field), "case {name:?}: field {field:?}, want {want_field:?}: {v}");
        assert!(!v["error"]["message"].as_str().unwrap_or("").is_empty(), "case {name:?}: no message: {v}");
    }

    // Authentication and header mistakes.
    let good = spec_with(|_| {});
    let no_auth = http().post(&url).body(good.clone()).send().unwrap();
    assert_eq!(no_auth.status().as_u16(), 401);
    assert_eq!(no_auth.headers()["www-authenticate"], "Bearer");
    let wrong = http().post(&url).bearer_auth("tenant-a-key-0123456789abcdeX").body(good.clone()).send().unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let basic =
        http().post(&url).header("authorization", format!("Basic {TENANT_A_KEY}")).body(good.clone()).send().unwrap();
    assert_eq!(basic.status().as_u16(), 401);
    let bad_key = http()
        .post(&url)
        .bearer_auth(TENANT_A_KEY)
        .header("idempotency-key", "k".repeat(300))
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(bad_key.status().as_u16(), 400);
    assert_eq!(bad_key.json::<Value>().unwrap()["error"]["field"], "Idempotency-Key");

    assert_eq!(counts(&db), (0, 0, 0), "a rejected request changed the store");

    // One good job, then the other tenant tries every route on it.
    let first = http()
        .post(&url)
        .bearer_auth(TENANT_A_KEY)
        .header("idempotency-key", "job-1")
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(first.status().as_u16(), 202);
    let id = first.json::<Value>().unwrap()["id"].as_str().unwrap().to_string();
    // The same key with another body is a conflict and creates nothing.
    let other_body = spec_with(|v| v["name"] = json!("other"));
    let reuse =
        http().post(&url).bearer_auth(TENANT_A_KEY).header("idempotency-key", "job-1").body(other_body).send().unwrap();
    assert_eq!(reuse.status().as_u16(), 422);
    assert_eq!(reuse.json::<Value>().unwrap()["error"]["field"], "Idempotency-Key");
    assert_eq!(counts(&db).0, 1, "the refused reuse stored nothing");
    // The same key and body replays the first answer.
    let replay = http()
        .post(&url)
        .bearer_auth(TENANT_A_KEY)
        .header("idempotency-key", "job-1")
        .body(good.clone())
        .send()
        .unwrap();
    assert_eq!(replay.status().as_u16(), 202);
    assert_eq!(replay.json::<Value>().unwrap()["id"], id.as_str());

    for path in [format!("/v1/jobs/{id}"), format!("/v1/jobs/{id}/result")] {
        let (status, v) = get(&format!("{}{path}", server.url), TENANT_B_KEY);
        assert_eq!(status, 404, "{path}: {v}");
        assert!(!v.to_string().contains(&id) || v["error"]["message"].as_str().unwrap().contains(&id));
    }
    let cancel = http().post(format!("{}/v1/jobs/{id}/cancel", server.url)).bearer_auth(TENANT_B_KEY).send().unwrap();
    assert_eq!(cancel.status().as_u16(), 404);
    let (status, _) = get(&format!("{}/v1/jobs/not-a-job", server.url), TENANT_A_KEY);
    assert_eq!(status, 404);
    let (status, _) = get(&format!("{}/v1/jobs/{id}", server.url), "");
    assert_eq!(status, 401);

    let docs = wait_all(&server.url, TENANT_A_KEY, std::slice::from_ref(&id), Duration::from_secs(60));
    assert_eq!(docs[0]["status"], "succeeded", "tenant B's cancel must not have touched it: {}", docs[0]);
    let (jobs, _, checkpoints) = counts(&db);
    assert_eq!((jobs, checkpoints), (1, 2));
}

/// The one size that cannot be checked at submission: a prompt built from
/// earlier outputs. A step naming an output 1,000 times under a 2 KiB
/// prompt limit is accepted (outputs are unknown then), and at run time
/// fails its job with the reason, without the oversized call being sent.
#[test]
fn a_prompt_that_would_render_over_the_limit_fails_its_job_at_render_time() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 10_000, tpm: 10_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (0.0, 0.0, 0.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "[limits]\nmax_prompt_bytes = 2048\n");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let body = spec_with(|v| v["steps"][1]["messages"][0]["content"] = json!("{{steps.a.output}}".repeat(1000)));
    let (status, v) = submit(&server.url, TENANT_A_KEY, &body);
    assert_eq!(status, 202, "{v}");
    let id = v["id"].as_str().unwrap().to_string();

    let docs = wait_all(&server.url, TENANT_A_KEY, std::slice::from_ref(&id), Duration::from_secs(60));
    let doc = &docs[0];
    assert_eq!(doc["status"], "failed", "{doc}");
    assert_eq!(doc["steps_done"], 1, "step a ran, step b did not: {doc}");
    let error = doc["error"].as_str().unwrap_or("");
    assert!(error.contains("rendered prompt would exceed 2048 bytes"), "{error}");
    assert!(error.contains("step b") && error.contains("messages[0]"), "the error names the step: {error}");
    let calls: Vec<String> = sim_requests(&sim).into_keys().filter(|k| k.starts_with(&format!("{id}/"))).collect();
    assert_eq!(calls, [format!("{id}/a")], "only step a reached the provider");
}
