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

/// An answer of about 1 MB (two choices of 512 KB, over the 400 KB of a
/// DynamoDB item) with a small one beside it, finishing in this order.
fn large_and_small(finished_at: i64) -> (Checkpoint, Checkpoint) {
    let big = |c: char| "lorem ipsum ".repeat(512 * 1024 / 12) + &c.to_string().repeat(512 * 1024 % 12);
    let large = Checkpoint {
        step: StepKey::Step(StepId::parse("draft").expect("step")),
        answer: StepAnswer::new(vec![
            AssistantMessage { content: Some(big('a')), finish_reason: Some("length".into()), ..Default::default() },
            AssistantMessage { content: Some(big('b')), finish_reason: Some("stop".into()), ..Default::default() },
        ])
        .expect("two choices"),
        usage: Usage { calls: 1, prompt_tokens: 10, completion_tokens: 262_144 },
        org: org("org-a"),
        model: model("gpt-4o-mini"),
        attempts: 1,
        started_at: T0,
        finished_at,
    };
    let small = Checkpoint {
        step: StepKey::Step(StepId::parse("title").expect("step")),
        answer: StepAnswer::text("The Lighthouse".into()),
        finished_at: finished_at + SEC,
        ..large.clone()
    };
    (large, small)
}

/// Outputs of any size up to what a step can answer are stored and read
/// back whole (on DynamoDB, through a pointer into S3), and the checkpoint
/// still counts once.
pub async fn a_checkpoint_of_about_a_megabyte_round_trips(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let lease = acquire(h, &id, "worker-a", T0).await;
    let (large, small) = large_and_small(T0 + SEC);
    assert!(large.answer_bytes() > 1_000_000, "{}", large.answer_bytes());
    jobs.put_checkpoint(&lease, &large, T0 + 1).await.expect("a 1 MB answer is stored");
    jobs.put_checkpoint(&lease, &small, T0 + 2).await.expect("a small one beside it");
    let stored = jobs.checkpoints(&id).await.expect("checkpoints");
    assert_eq!(stored.len(), 2);
    assert!(stored[0] == large, "the large answer reads back whole ({} bytes)", stored[0].answer_bytes());
    assert_eq!(stored[1], small);
    // A retried write (its first answer lost) conflicts and changes nothing.
    let again = jobs.put_checkpoint(&lease, &large, T0 + 3).await;
    assert!(matches!(&again, Err(StorageError::CheckpointExists(k)) if k == &large.step), "{again:?}");
    assert!(jobs.checkpoints(&id).await.expect("checkpoints")[0] == large);
    let job = get(h, &id).await;
    assert_eq!((job.steps_done, job.usage.completion_tokens), (2, 2 * 262_144));
}

/// Pages follow the order of `checkpoints`, stop at the byte budget (but
/// hold at least one step), and name the step to continue after.
pub async fn checkpoint_pages_split_by_bytes_and_steps(h: &Harness) {
    use ratepool::storage::PageRequest;
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let lease = acquire(h, &id, "worker-a", T0).await;
    let (large, small) = large_and_small(T0 + SEC);
    jobs.put_checkpoint(&lease, &large, T0 + 1).await.expect("large");
    jobs.put_checkpoint(&lease, &small, T0 + 2).await.expect("small");
    let id = &id;
    let page = |after: Option<&StepKey>, max_steps: usize, max_bytes: u64| {
        let req = PageRequest { after: after.cloned(), max_steps, max_bytes };
        async move { jobs.checkpoint_page(id, &req).await.expect("page") }
    };
    // Everything fits: one page, nothing next.
    let all = page(None, 100, 4 << 20).await.expect("known job");
    assert_eq!((all.checkpoints.len(), all.next), (2, None));
    // The large step alone is over the budget: it comes alone.
    let first = page(None, 100, 1024).await.expect("first page");
    assert!(first.checkpoints == vec![large.clone()], "the large step, whole");
    assert_eq!(first.next.as_ref(), Some(&large.step));
    let second = page(first.next.as_ref(), 100, 1024).await.expect("second page");
    assert_eq!((second.checkpoints, second.next), (vec![small.clone()], None));
    // A step cap of one splits the same way.
    assert_eq!(page(None, 1, 4 << 20).await.expect("capped").next.as_ref(), Some(&large.step));
    // An `after` that is not one of the job's steps.
    let unknown = StepKey::Step(StepId::parse("nope").expect("step"));
    assert!(page(Some(&unknown), 100, 1024).await.is_none());
}
