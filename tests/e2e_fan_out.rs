//! End to end on SQLite, with `ratepool sim` and `ratepool serve` as
//! processes: the screenplay example (a `json_schema` outline whose scenes
//! fan out) succeeds although the server is SIGKILLed mid-fan-out, and no
//! instance finished before the kill is called again (counted at the
//! simulator per `X-Client-Request-Id`); an outline that is not an array,
//! or has more elements than the job's cap, fails the job naming the step
//! and the path; a bad request field is a 400 naming it, with nothing
//! stored or enqueued.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ratepool::domain::{JobId, StepKey, SystemClock, TenantId};
use ratepool::local::{SqliteBackend, SqliteOptions};
use serde_json::{Value, json};

fn open_db(dir: &std::path::Path) -> ratepool::storage::Backend {
    SqliteBackend::open(
        &dir.join("ratepool.db"),
        SqliteOptions { visibility_timeout: Duration::from_secs(3), clock: Arc::new(SystemClock) },
    )
    .expect("open the server's database")
    .backend()
}

fn job_doc(url: &str, id: &str) -> Value {
    get(&format!("{url}/v1/jobs/{id}"), TENANT_A_KEY).1
}

#[test]
fn the_screenplay_fans_out_and_a_kill_mid_fan_out_repeats_no_finished_instance() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [
        OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 },
        OrgSpec { name: "org-b", rpm: 100_000, tpm: 100_000_000 },
    ];
    // Scenes take about half a second each, so the kill lands among them.
    let sim = start_sim(dir.path(), &orgs, (50.0, 0.5, 1.0));
    let workers = "[workers]\nconcurrency = 4\nstep_parallelism = 4\nvisibility_timeout_secs = 3\n";
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, workers);
    let mut server = start_server(dir.path(), &cfg, &orgs, "serve-1.log");
    let (status, body) = submit(&server.url, TENANT_A_KEY, &screenplay(0));
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();

    // Before the outline: 12 steps, the fan-out counted as one.
    assert_eq!(job_doc(&server.url, &id)["steps_total"], 12);
    // The seven steps before the fan-out, then a few scenes: kill -9.
    let start = Instant::now();
    let total_known = loop {
        let d = job_doc(&server.url, &id);
        if d["steps_done"].as_u64().unwrap_or(0) >= 10 {
            break d["steps_total"].as_u64().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no progress: {d}");
        std::thread::sleep(Duration::from_millis(50));
    };
    server.kill();
    assert!(total_known > 12, "the outline's size is in steps_total before its scenes run: {total_known}");

    let rt = tokio::runtime::Runtime::new().unwrap();
    let job = JobId::parse(id.as_str()).unwrap();
    let at_kill: Vec<StepKey> =
        rt.block_on(open_db(dir.path()).jobs.checkpoints(&job)).unwrap().into_iter().map(|c| c.step).collect();
    let scenes_at_kill = at_kill.iter().filter(|k| k.index().is_some()).count();
    let scenes = total_known as usize - 11;
    assert!(
        scenes_at_kill >= 1 && scenes_at_kill < scenes,
        "the kill must land mid-fan-out: {scenes_at_kill} of {scenes} scenes were done"
    );

    let server = start_server(dir.path(), &cfg, &orgs, "serve-2.log");
    let docs = wait_all(&server.url, TENANT_A_KEY, std::slice::from_ref(&id), Duration::from_secs(180));
    assert_eq!(docs[0]["status"], "succeeded", "{}", docs[0]);
    assert_eq!(docs[0]["steps_total"], total_known, "the same expansion after the restart");
    assert_eq!(docs[0]["steps_done"], total_known);

    let counts = sim_requests(&sim);
    for key in &at_kill {
        assert_eq!(counts.get(&format!("{id}/{key}")), Some(&1), "{key} was finished before the kill and called again");
    }
    for i in 0..scenes {
        assert!(counts.get(&format!("{id}/scene[{i}]")).is_some_and(|&n| n >= 1), "scene[{i}] was never called");
    }
    assert!(!counts.contains_key(&format!("{id}/scene[{scenes}]")), "no instance past the outline's scenes");
    assert!(!counts.contains_key(&format!("{id}/scene")), "the fan-out step itself makes no call");

    // The result: every instance's text, and the outline's structured output.
    let (status, result) = get(&format!("{}/v1/jobs/{id}/result", server.url), TENANT_A_KEY);
    assert_eq!(status, 200, "{result}");
    let outputs = result["outputs"].as_object().unwrap();
    assert_eq!(outputs.len(), total_known as usize);
    let outline = &result["messages"]["outline"];
    assert_eq!(outline["finish_reason"], "stop", "{outline}");
    let parsed = &outline["parsed"];
    assert_eq!(parsed["scenes"].as_array().map(Vec::len), Some(scenes), "{outline}");
    assert_eq!(outline["content"].as_str().map(|c| serde_json::from_str::<Value>(c).unwrap()), Some(parsed.clone()));
    assert!(outputs["scene[0]"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(result["messages"]["scene[3]"]["parsed"].is_null(), "a text step has no parsed JSON");
    println!("fan-out: {scenes} scenes, {scenes_at_kill} done at the kill, none called again");
}

#[test]
fn an_outline_that_is_not_an_array_or_too_long_fails_the_job_naming_step_and_path() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 100_000, tpm: 100_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (5.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let cases = broken_outlines();
    let ids: Vec<String> = cases
        .iter()
        .map(|(body, _)| {
            let (status, b) = submit(&server.url, TENANT_A_KEY, body);
            assert_eq!(status, 202, "{b}");
            b["id"].as_str().unwrap().to_string()
        })
        .collect();
    let docs = wait_all(&server.url, TENANT_A_KEY, &ids, Duration::from_secs(60));
    let counts = sim_requests(&sim);
    for ((_, reason), (doc, id)) in cases.iter().zip(docs.iter().zip(&ids)) {
        assert_eq!(doc["status"], "failed", "{doc}");
        assert_eq!(doc["error"].as_str(), Some(*reason), "{doc}");
        assert_eq!(doc["steps_done"], 1, "only the outline ran: {doc}");
        assert!(counts.keys().all(|k| !k.starts_with(&format!("{id}/scene"))), "no instance was called: {counts:?}");
    }
}

/// A change to a valid spec that breaks one field.
type Edit = Box<dyn Fn(&mut Value)>;

#[test]
fn a_bad_request_field_is_a_400_naming_it_and_nothing_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let orgs = [OrgSpec { name: "org-a", rpm: 1_000, tpm: 1_000_000 }];
    let sim = start_sim(dir.path(), &orgs, (5.0, 0.0, 1.0));
    let cfg = write_serve_config(dir.path(), &sim.url, &orgs, "");
    let server = start_server(dir.path(), &cfg, &orgs, "serve.log");
    let example: Value = serde_json::from_str(&screenplay(0)).unwrap();
    let steps = example["steps"].as_array().unwrap();
    let at = |id: &str| steps.iter().position(|s| s["id"] == id).unwrap();
    let (outline, scene) = (at("outline"), at("scene"));
    let cases: Vec<(Edit, String, &str)> = vec![
        (Box::new(|v| v["defaults"]["top_p"] = json!(1.5)), "defaults.top_p".into(), "between 0 and 1"),
        (Box::new(move |v| v["steps"][scene]["seed"] = json!("42")), format!("steps[{scene}].seed"), "an integer"),
        (Box::new(move |v| v["steps"][scene]["n"] = json!(0)), format!("steps[{scene}].n"), "between 1 and 16"),
        (
            Box::new(move |v| v["steps"][outline]["response_format"]["json_schema"]["schema"] = json!("object")),
            format!("steps[{outline}].response_format.json_schema.schema"),
            "JSON object",
        ),
        (Box::new(move |v| v["steps"][scene]["stream"] = json!(true)), format!("steps[{scene}].stream"), "read whole"),
        (
            Box::new(move |v| v["steps"][scene]["for_each"] = json!("steps.outline.output")),
            format!("steps[{scene}].for_each"),
            "not an array",
        ),
        (
            Box::new(move |v| v["steps"][scene]["messages"][1]["content"] = json!("{{item.headng}}")),
            format!("steps[{scene}].messages[1].content"),
            "no property \"headng\"",
        ),
    ];
    for (edit, field, needle) in &cases {
        let mut v = example.clone();
        edit(&mut v);
        let (status, body) = submit(&server.url, TENANT_A_KEY, &v.to_string());
        assert_eq!(status, 400, "{field}: {body}");
        assert_eq!(body["error"]["field"].as_str(), Some(field.as_str()), "{body}");
        assert!(body["error"]["message"].as_str().unwrap_or("").contains(needle), "{field}: {body}");
    }
    // Nothing stored, nothing enqueued, nothing called.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let db = open_db(dir.path());
    let alpha = TenantId::parse("alpha").unwrap();
    assert_eq!(rt.block_on(db.jobs.jobs_in_flight(&alpha)).unwrap(), 0);
    let q = rt.block_on(db.queue.stats()).unwrap();
    assert_eq!((q.visible, q.in_flight), (0, 0), "{q:?}");
    assert_eq!(sim_stats(&sim)["total_calls"], 0);
}
