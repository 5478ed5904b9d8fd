//! Conformance of what steps that speak the whole chat API store: a
//! checkpoint keeps the whole answer (every choice's content, tool calls,
//! refusal and finish reason) for a step and for a fan-out instance, and
//! a job's `steps_total` grows when a fan-out's size is known, only under
//! the job's lease.

use ratepool::answer::{AssistantMessage, FunctionCall, StepAnswer, ToolCall};
use ratepool::domain::{StepId, StepKey, Usage};
use ratepool::storage::{Checkpoint, StorageError};

use super::{Harness, SEC, T0, TTL, acquire, assert_lease_lost, create, get, model, org};

fn tool_call(id: &str, args: &str) -> ToolCall {
    ToolCall {
        id: id.into(),
        kind: "function".into(),
        function: FunctionCall { name: "lookup".into(), arguments: args.into() },
    }
}

pub async fn checkpoint_keeps_the_whole_answer_of_a_step_and_an_instance(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let lease = acquire(h, &id, "worker-a", T0).await;
    // A tool call with no content, beside a second choice that refused.
    let plan = Checkpoint {
        step: StepKey::Step(StepId::parse("plan").expect("step")),
        answer: StepAnswer::new(vec![
            AssistantMessage {
                content: None,
                refusal: None,
                tool_calls: vec![tool_call("call_1", "{\"city\":\"Oban\"}"), tool_call("call_2", "{}")],
                finish_reason: Some("tool_calls".into()),
            },
            AssistantMessage {
                content: Some(String::new()),
                refusal: Some("I can't help with that.".into()),
                tool_calls: Vec::new(),
                finish_reason: Some("stop".into()),
            },
        ])
        .expect("two choices"),
        usage: Usage { calls: 1, prompt_tokens: 50, completion_tokens: 20 },
        org: org("org-a"),
        model: model("gpt-4o-mini"),
        attempts: 1,
        started_at: T0 + SEC,
        finished_at: T0 + 2 * SEC,
    };
    // An instance of a fan-out step whose content is JSON.
    let scene = Checkpoint {
        step: StepKey::Instance { step: StepId::parse("scene").expect("step"), index: 12 },
        answer: StepAnswer::new(vec![AssistantMessage {
            content: Some("{\"heading\": \"INT. LIGHTHOUSE - NIGHT\", \"n\": [1, 2]}".into()),
            finish_reason: Some("length".into()),
            ..AssistantMessage::default()
        }])
        .expect("one choice"),
        ..plan.clone()
    };
    jobs.put_checkpoint(&lease, &plan, T0 + 1).await.expect("plan");
    jobs.put_checkpoint(&lease, &scene, T0 + 2).await.expect("scene[12]");
    let mut stored = jobs.checkpoints(&id).await.expect("checkpoints");
    stored.sort_by(|a, b| a.step.cmp(&b.step));
    assert_eq!(stored, vec![plan.clone(), scene.clone()]);
    assert_eq!(stored[0].output(), "", "a tool call has no text");
    assert_eq!(stored[1].step.to_string(), "scene[12]");

    // The same instance again is a conflict and changes nothing.
    let again = jobs.put_checkpoint(&lease, &scene, T0 + 3).await;
    assert!(
        matches!(&again, Err(StorageError::CheckpointExists(k)) if k == &scene.step),
        "duplicate instance: {again:?}"
    );
    assert_eq!(get(h, &id).await.steps_done, 2);
}

pub async fn steps_total_is_set_only_under_the_lease(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    assert_eq!(get(h, &id).await.steps_total, 3);
    let first = acquire(h, &id, "worker-a", T0).await;
    jobs.set_steps_total(&first, 29, T0 + 1).await.expect("set under the lease");
    assert_eq!(get(h, &id).await.steps_total, 29);
    // The same value again (a resumed run expanding the same fan-out).
    jobs.set_steps_total(&first, 29, T0 + 2).await.expect("idempotent");
    assert_eq!(get(h, &id).await.steps_total, 29);

    // Past its expiry the lease guards nothing, and after a takeover the
    // old epoch writes nothing.
    let expired = T0 + TTL.as_micros() as i64 + 1;
    assert_lease_lost(jobs.set_steps_total(&first, 40, expired).await, "expired lease");
    let second = acquire(h, &id, "worker-b", expired).await;
    assert_lease_lost(jobs.set_steps_total(&first, 41, expired + 1).await, "stale epoch");
    assert_eq!(get(h, &id).await.steps_total, 29);
    jobs.set_steps_total(&second, 30, expired + 2).await.expect("the new holder");
    assert_eq!(get(h, &id).await.steps_total, 30);
    // A cancelled job is no longer running: nothing is written.
    jobs.cancel_job(&id, expired + 3).await.expect("cancel");
    assert_lease_lost(jobs.set_steps_total(&second, 31, expired + 4).await, "cancelled job");
    assert_eq!(get(h, &id).await.steps_total, 30);
}
