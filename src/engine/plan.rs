//! What of one job may run now: its steps, and the instances of its
//! fan-out (`for_each`) steps once their size is known.
//!
//! A fan-out step is expanded when every step it waits for is done, from
//! their checkpointed answers only, so a resumed run expands it to exactly
//! the same instances and finds the finished ones among its checkpoints.
//! A step that waits for a fan-out step waits for all of its instances.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde_json::Value;

use crate::answer::StepAnswer;
use crate::domain::{StepId, StepKey};
use crate::spec::template::resolve_value;
use crate::spec::{JobSpec, Scope, StepOutput};
use crate::storage::Checkpoint;

/// One call to make: a step, or one instance of a fan-out step.
#[derive(Debug, Clone)]
pub(crate) struct Unit {
    /// Index into the spec's steps.
    pub step: usize,
    pub key: StepKey,
    /// The instance's element of the fan-out array, and its index.
    pub item: Option<(Arc<Vec<Value>>, usize)>,
}

enum State {
    Plain { answer: Option<Arc<StepAnswer>>, running: bool },
    FanOut(Option<Expansion>),
}

struct Expansion {
    items: Arc<Vec<Value>>,
    answers: Vec<Option<Arc<StepAnswer>>>,
    running: Vec<bool>,
}

pub(crate) struct Plan {
    spec: Arc<JobSpec>,
    states: Vec<State>,
    /// Instances one fan-out step may have.
    cap: u32,
    /// Instance answers read from checkpoints, until their step expands.
    found: HashMap<usize, BTreeMap<u32, Arc<StepAnswer>>>,
}

impl Plan {
    /// The plan of a job whose checkpoints are `done` (of any earlier run).
    pub fn new(spec: Arc<JobSpec>, cap: u32, done: Vec<Checkpoint>) -> Self {
        let mut states: Vec<State> =
            spec.steps
                .iter()
                .map(|s| {
                    if s.for_each.is_some() {
                        State::FanOut(None)
                    } else {
                        State::Plain { answer: None, running: false }
                    }
                })
                .collect();
        let mut found: HashMap<usize, BTreeMap<u32, Arc<StepAnswer>>> = HashMap::new();
        for cp in done {
            let Some(i) = spec.step_index(cp.step.step()) else { continue };
            match (&mut states[i], cp.step.index()) {
                (State::Plain { answer, .. }, None) => *answer = Some(Arc::new(cp.answer)),
                (State::FanOut(_), Some(k)) => {
                    found.entry(i).or_default().insert(k, Arc::new(cp.answer));
                }
                // A checkpoint that does not fit the spec (it cannot
                // happen: the spec is the one the job was stored with).
                _ => {}
            }
        }
        Self { spec, states, cap, found }
    }

    fn complete(&self, i: usize) -> bool {
        match &self.states[i] {
            State::Plain { answer, .. } => answer.is_some(),
            State::FanOut(Some(e)) => e.answers.iter().all(Option::is_some),
            State::FanOut(None) => false,
        }
    }

    fn deps_complete(&self, i: usize) -> bool {
        self.spec.steps[i].deps.iter().all(|&d| self.complete(d))
    }

    /// Expands every fan-out step whose dependencies are done. An `Err` is
    /// why the job fails: the array is missing, is not an array, or has
    /// more elements than the cap.
    pub fn expand_ready(&mut self) -> Result<(), String> {
        for i in 0..self.states.len() {
            if !matches!(self.states[i], State::FanOut(None)) || !self.deps_complete(i) {
                continue;
            }
            let step = &self.spec.steps[i];
            let Some(source) = &step.for_each else { continue };
            let value = resolve_value(source, &self.scope_for(i, None))
                .map_err(|e| format!("step {}: for_each {e}", step.id))?;
            let Value::Array(items) = value else {
                return Err(format!(
                    "step {}: for_each {source}: is {}, not an array",
                    step.id,
                    crate::spec::reference::kind(&value)
                ));
            };
            if items.len() > self.cap as usize {
                return Err(format!(
                    "step {}: for_each {source}: has {} elements, more than the cap of {} (max_fan_out)",
                    step.id,
                    items.len(),
                    self.cap
                ));
            }
            let mut answers = vec![None; items.len()];
            for (k, a) in self.found.remove(&i).unwrap_or_default() {
                if let Some(slot) = answers.get_mut(k as usize) {
                    *slot = Some(a);
                }
            }
            let running = vec![false; items.len()];
            self.states[i] = State::FanOut(Some(Expansion { items: Arc::new(items), answers, running }));
        }
        Ok(())
    }

    /// Up to `max` units whose dependencies are done and that are neither
    /// done nor running, in spec order (instances in index order); they
    /// count as running from now on.
    pub fn take_ready(&mut self, max: usize) -> Vec<Unit> {
        let mut out = Vec::new();
        for i in 0..self.states.len() {
            if out.len() >= max {
                break;
            }
            if !self.deps_complete(i) {
                continue;
            }
            let id = self.spec.steps[i].id.clone();
            match &mut self.states[i] {
                State::Plain { answer: None, running } if !*running => {
                    *running = true;
                    out.push(Unit { step: i, key: StepKey::Step(id), item: None });
                }
                State::FanOut(Some(e)) => {
                    for k in 0..e.items.len() {
                        if out.len() >= max {
                            break;
                        }
                        if e.answers[k].is_none() && !e.running[k] {
                            e.running[k] = true;
                            let key = StepKey::Instance { step: id.clone(), index: k as u32 };
                            out.push(Unit { step: i, key, item: Some((e.items.clone(), k)) });
                        }
                    }
                }
                _ => {}
            }
        }
        out
    }

    /// Records a unit's checkpointed answer.
    pub fn finish(&mut self, unit: &Unit, answer: StepAnswer) {
        let answer = Arc::new(answer);
        match (&mut self.states[unit.step], &unit.item) {
            (State::Plain { answer: slot, running }, None) => {
                *slot = Some(answer);
                *running = false;
            }
            (State::FanOut(Some(e)), Some((_, k))) => {
                e.answers[*k] = Some(answer);
                e.running[*k] = false;
            }
            _ => {}
        }
    }

    /// Every step done, every fan-out expanded and all its instances done.
    pub fn all_done(&self) -> bool {
        (0..self.states.len()).all(|i| self.complete(i))
    }

    /// Steps the job has as far as is known: each plain step, each
    /// expanded fan-out's instances, and 1 for each fan-out not expanded.
    pub fn steps_total(&self) -> u32 {
        let n: usize = self
            .states
            .iter()
            .map(|s| match s {
                State::Plain { .. } | State::FanOut(None) => 1,
                State::FanOut(Some(e)) => e.items.len(),
            })
            .sum();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// What `unit`'s templates may read: its dependencies' answers, and
    /// its element for an instance. Owned, so the call runs apart.
    pub fn scope(&self, unit: &Unit) -> StepScope {
        self.scope_for(unit.step, unit.item.clone())
    }

    fn scope_for(&self, i: usize, item: Option<(Arc<Vec<Value>>, usize)>) -> StepScope {
        let mut steps = HashMap::new();
        for &d in &self.spec.steps[i].deps {
            let id = self.spec.steps[d].id.clone();
            match &self.states[d] {
                State::Plain { answer: Some(a), .. } => {
                    steps.insert(id, Dep::One(a.clone()));
                }
                State::FanOut(Some(e)) => {
                    let all: Option<Vec<Arc<StepAnswer>>> = e.answers.iter().cloned().collect();
                    if let Some(all) = all {
                        steps.insert(id, Dep::Group(all));
                    }
                }
                _ => {}
            }
        }
        StepScope { spec: self.spec.clone(), steps, item }
    }
}

enum Dep {
    One(Arc<StepAnswer>),
    Group(Vec<Arc<StepAnswer>>),
}

/// A unit's view of the job for rendering ([`Scope`]).
pub(crate) struct StepScope {
    spec: Arc<JobSpec>,
    steps: HashMap<StepId, Dep>,
    item: Option<(Arc<Vec<Value>>, usize)>,
}

impl Scope for StepScope {
    fn input(&self, name: &str) -> Option<&str> {
        self.spec.inputs.get(name).map(String::as_str)
    }
    fn step(&self, id: &StepId) -> Option<StepOutput<'_>> {
        self.steps.get(id).map(|d| match d {
            Dep::One(a) => StepOutput::One(a),
            Dep::Group(all) => StepOutput::Group(all),
        })
    }
    fn item(&self) -> Option<(&Value, usize)> {
        self.item.as_ref().and_then(|(items, k)| items.get(*k).map(|v| (v, *k)))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::domain::{ModelName, OrgName, Usage};
    use crate::spec::SpecLimits;

    fn spec(max_items: u64) -> Arc<JobSpec> {
        let body = json!({
            "name": "fan", "defaults": {"model": "m"},
            "steps": [
                {"id": "outline", "messages": [{"role": "user", "content": "Outline in JSON"}],
                 "response_format": {"type": "json_schema", "json_schema": {"name": "o", "schema":
                    {"type": "object", "properties": {"scenes": {"type": "array", "maxItems": max_items, "items": {"type": "string"}}}}}}},
                {"id": "scene", "for_each": "steps.outline.json.scenes",
                 "messages": [{"role": "user", "content": "Scene {{index}}: {{item}}"}]},
                {"id": "notes", "messages": [{"role": "user", "content": "{{join(steps.scene.outputs, \"|\")}}"}]}
            ]
        });
        Arc::new(JobSpec::parse(body.to_string().as_bytes(), &SpecLimits::default(), &|_| true).unwrap())
    }

    fn cp(key: StepKey, text: &str) -> Checkpoint {
        Checkpoint {
            step: key,
            answer: StepAnswer::text(text.into()),
            usage: Usage::default(),
            org: OrgName::parse("o").unwrap(),
            model: ModelName::parse("m").unwrap(),
            attempts: 1,
            started_at: 0,
            finished_at: 0,
        }
    }

    fn keys(units: &[Unit]) -> Vec<String> {
        units.iter().map(|u| u.key.to_string()).collect()
    }

    fn run_to_end(plan: &mut Plan, answers: &mut Vec<String>) {
        loop {
            plan.expand_ready().unwrap();
            let units = plan.take_ready(usize::MAX);
            if units.is_empty() {
                break;
            }
            for u in units {
                let text = match u.key.to_string().as_str() {
                    "outline" => json!({"scenes": ["dawn", "storm", "calm"]}).to_string(),
                    _ => {
                        let scope = plan.scope(&u);
                        let t = &plan.spec.steps[u.step].messages[0].content;
                        t.as_ref().unwrap().render(&scope, 1 << 20).unwrap()
                    }
                };
                answers.push(format!("{}={text}", u.key));
                plan.finish(&u, StepAnswer::text(text));
            }
        }
    }

    #[test]
    fn a_fan_out_expands_from_its_source_and_its_dependents_wait_for_every_instance() {
        let mut plan = Plan::new(spec(10), 256, Vec::new());
        assert_eq!(plan.steps_total(), 3);
        plan.expand_ready().unwrap();
        assert_eq!(keys(&plan.take_ready(8)), ["outline"]);
        assert!(plan.take_ready(8).is_empty(), "the outline is running");
        let outline = plan.take_ready(0);
        assert!(outline.is_empty());
        let unit = Unit { step: 0, key: StepKey::Step(StepId::parse("outline").unwrap()), item: None };
        plan.finish(&unit, StepAnswer::text(json!({"scenes": ["dawn", "storm", "calm"]}).to_string()));
        plan.expand_ready().unwrap();
        assert_eq!(plan.steps_total(), 5, "outline, three scenes, notes");
        let two = plan.take_ready(2);
        assert_eq!(keys(&two), ["scene[0]", "scene[1]"], "parallelism counts instances");
        let scope = plan.scope(&two[1]);
        assert_eq!(scope.item(), Some((&json!("storm"), 1)));
        for u in &two {
            plan.finish(u, StepAnswer::text(format!("S{}", u.key)));
        }
        assert_eq!(keys(&plan.take_ready(8)), ["scene[2]"], "notes waits for every instance");
        let last = Unit {
            step: 1,
            key: StepKey::Instance { step: StepId::parse("scene").unwrap(), index: 2 },
            item: Some((Arc::new(vec![]), 2)),
        };
        plan.finish(&last, StepAnswer::text("Sscene[2]".into()));
        let notes = plan.take_ready(8);
        assert_eq!(keys(&notes), ["notes"]);
        let text = plan.spec.steps[2].messages[0].content.as_ref().unwrap().render(&plan.scope(&notes[0]), 1 << 20);
        assert_eq!(text.unwrap(), "Sscene[0]|Sscene[1]|Sscene[2]");
        plan.finish(&notes[0], StepAnswer::text("n".into()));
        assert!(plan.all_done());
    }

    #[test]
    fn a_resumed_plan_expands_identically_and_runs_only_what_is_missing() {
        let mut calm = Vec::new();
        run_to_end(&mut Plan::new(spec(10), 256, Vec::new()), &mut calm);
        // A crash after the outline and scene[1]: a new run from those
        // checkpoints makes only the missing calls, with the same results.
        let outline = json!({"scenes": ["dawn", "storm", "calm"]}).to_string();
        let scene = StepId::parse("scene").unwrap();
        let done = vec![
            cp(StepKey::Step(StepId::parse("outline").unwrap()), &outline),
            cp(StepKey::Instance { step: scene.clone(), index: 1 }, "Scene 1: storm"),
        ];
        let mut plan = Plan::new(spec(10), 256, done);
        plan.expand_ready().unwrap();
        assert_eq!(plan.steps_total(), 5);
        let mut resumed = Vec::new();
        run_to_end(&mut plan, &mut resumed);
        assert_eq!(
            resumed,
            ["scene[0]=Scene 0: dawn", "scene[2]=Scene 2: calm", "notes=Scene 0: dawn|Scene 1: storm|Scene 2: calm"]
        );
        assert!(calm.contains(&resumed[2]), "the same as a run without a crash: {calm:?}");
        assert!(plan.all_done());
    }

    #[test]
    fn a_source_that_is_not_an_array_or_is_over_the_cap_fails_naming_step_and_path() {
        let outline = |v: Value| vec![cp(StepKey::Step(StepId::parse("outline").unwrap()), &v.to_string())];
        let mut plan = Plan::new(spec(10), 2, outline(json!({"scenes": ["a", "b", "c"]})));
        assert_eq!(
            plan.expand_ready().unwrap_err(),
            "step scene: for_each steps.outline.json.scenes: has 3 elements, more than the cap of 2 (max_fan_out)"
        );
        let mut plan = Plan::new(spec(10), 256, outline(json!({"scenes": "none"})));
        assert_eq!(
            plan.expand_ready().unwrap_err(),
            "step scene: for_each steps.outline.json.scenes: is a string, not an array"
        );
        let mut plan = Plan::new(spec(10), 256, outline(json!({"acts": []})));
        assert_eq!(
            plan.expand_ready().unwrap_err(),
            "step scene: for_each steps.outline.json.scenes: no field \"scenes\" (fields: acts)"
        );
        // An empty array is a fan-out of none: its dependents run at once.
        let mut plan = Plan::new(spec(10), 256, outline(json!({"scenes": []})));
        plan.expand_ready().unwrap();
        assert_eq!(plan.steps_total(), 2);
        assert_eq!(keys(&plan.take_ready(8)), ["notes"]);
    }
}
