//! Validated identifiers and small value types shared by every layer.
//!
//! Each newtype is built once by a parser that can fail; everything downstream
//! takes the validated type, so an id that reached the engine is known good.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

fn check_token(kind: &str, s: &str, max: usize) -> Result<(), InvalidId> {
    if s.is_empty() {
        return Err(InvalidId(format!("{kind} must not be empty")));
    }
    if s.len() > max {
        return Err(InvalidId(format!("{kind} is longer than {max} characters")));
    }
    if !s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) {
        return Err(InvalidId(format!("{kind} {s:?} may contain only letters, digits, '-', '_', '.' and ':'")));
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $max:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(s: impl Into<String>) -> Result<Self, InvalidId> {
                let s = s.into();
                check_token($kind, &s, $max)?;
                Ok(Self(s))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                Self::parse(s)
            }
        }
        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A job's id: a UUIDv7 string minted by the API, so ids sort by creation.
    JobId, "job id", 64
);
id_type!(
    /// A tenant (an API client team), as named in the config.
    TenantId, "tenant name", 64
);
id_type!(
    /// A provider organization, as named in the config.
    OrgName, "org name", 64
);
id_type!(
    /// A step's id inside one job spec.
    StepId, "step id", 64
);
id_type!(
    /// A model name as the provider spells it (`gpt-4o-mini`).
    ModelName, "model", 128
);

/// What one checkpoint is for: a step of the spec, or one instance of a
/// fan-out (`for_each`) step, written `scene[3]`. Users cannot put `[` in a
/// step id, so an instance key never names a step of the spec.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum StepKey {
    Step(StepId),
    Instance { step: StepId, index: u32 },
}

impl StepKey {
    /// Reads the stored form (`scene` or `scene[3]`).
    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        let Some(open) = s.strip_suffix(']').and_then(|rest| rest.find('[').map(|i| (&rest[..i], &rest[i + 1..])))
        else {
            return StepId::parse(s).map(Self::Step);
        };
        let (step, index) = open;
        let index = match index.parse::<u32>() {
            Ok(i) if index == i.to_string() => i,
            _ => return Err(InvalidId(format!("instance index in {s:?} is not a number"))),
        };
        Ok(Self::Instance { step: StepId::parse(step)?, index })
    }

    /// The spec's step this key belongs to.
    pub fn step(&self) -> &StepId {
        match self {
            Self::Step(s) | Self::Instance { step: s, .. } => s,
        }
    }

    /// The instance's index, for an instance of a fan-out step.
    pub fn index(&self) -> Option<u32> {
        match self {
            Self::Step(_) => None,
            Self::Instance { index, .. } => Some(*index),
        }
    }
}

impl From<StepId> for StepKey {
    fn from(s: StepId) -> Self {
        Self::Step(s)
    }
}

impl fmt::Display for StepKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Step(s) => f.write_str(s.as_str()),
            Self::Instance { step, index } => write!(f, "{step}[{index}]"),
        }
    }
}

impl TryFrom<String> for StepKey {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::parse(&s)
    }
}

impl From<StepKey> for String {
    fn from(k: StepKey) -> String {
        k.to_string()
    }
}

impl JobId {
    /// A fresh, time-ordered id.
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }
}

/// A client's idempotency key (`Idempotency-Key`): 1 to 255 visible ASCII
/// characters. Chosen by the client, so it is only ever compared, never
/// trusted to be free of `#`, `/` or other separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(s: &str) -> Result<Self, InvalidId> {
        let s = s.trim();
        if s.is_empty() || s.len() > Self::MAX_LEN || !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InvalidId(format!("must be 1 to {} visible ASCII characters", Self::MAX_LEN)));
        }
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<IdempotencyKey> for String {
    fn from(k: IdempotencyKey) -> String {
        k.0
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which lane a job waits in; interactive is served first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    #[default]
    Interactive,
    Batch,
}

impl Priority {
    /// The lowercase name, as serde writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Interactive => "interactive",
            Self::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "interactive" => Some(Self::Interactive),
            "batch" => Some(Self::Batch),
            _ => None,
        }
    }
}

/// Token and call counts of finished work, as the provider reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }
    pub fn add(&mut self, other: &Usage) {
        self.calls += other.calls;
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// Microseconds since the Unix epoch. Leases, checkpoints and ledger TATs are
/// compared across processes, so they use wall-clock time, not `Instant`.
pub type Micros = i64;

/// A duration in whole microseconds, saturating far in the future.
pub fn duration_micros(d: std::time::Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// Where "now" comes from; injected so leases and the ledger are tested
/// without sleeping.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Micros;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Micros {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        d.as_micros() as Micros
    }
}

/// A clock that moves only when told to; for tests.
#[derive(Debug, Default)]
pub struct ManualClock(std::sync::atomic::AtomicI64);

impl ManualClock {
    pub fn new(start: Micros) -> Self {
        Self(std::sync::atomic::AtomicI64::new(start))
    }
    pub fn advance(&self, by: std::time::Duration) {
        self.0.fetch_add(by.as_micros() as i64, std::sync::atomic::Ordering::SeqCst);
    }
    pub fn set(&self, to: Micros) {
        self.0.store(to, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Micros {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Reads secrets from an environment (injected so tests need not mutate
/// the process environment).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Env for std::collections::BTreeMap<String, String> {
    fn var(&self, name: &str) -> Option<String> {
        self.get(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_bad_characters_and_lengths() {
        assert!(StepId::parse("scene_01").is_ok());
        assert!(StepId::parse("").is_err());
        assert!(StepId::parse("a b").is_err());
        assert!(StepId::parse("x".repeat(65)).is_err());
        assert!(serde_json::from_str::<StepId>("\"ok-1\"").is_ok());
        assert!(serde_json::from_str::<StepId>("\"no/slash\"").is_err());
    }

    #[test]
    fn idempotency_keys_are_visible_ascii_up_to_255() {
        assert_eq!(IdempotencyKey::parse(" job-1/step#2 ").unwrap().as_str(), "job-1/step#2");
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("a b").is_err());
        assert!(IdempotencyKey::parse("caf\u{e9}").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(255)).is_ok());
        assert!(IdempotencyKey::parse(&"k".repeat(256)).is_err());
    }

    #[test]
    fn step_keys_name_steps_and_instances_and_round_trip() {
        let scene = StepId::parse("act1.scene").unwrap();
        let k = StepKey::parse("act1.scene[12]").unwrap();
        assert_eq!(k, StepKey::Instance { step: scene.clone(), index: 12 });
        assert_eq!((k.step(), k.index(), k.to_string().as_str()), (&scene, Some(12), "act1.scene[12]"));
        assert_eq!(StepKey::parse("outline").unwrap(), StepKey::Step(StepId::parse("outline").unwrap()));
        for bad in ["a[", "a[]", "a[x]", "a[-1]", "a[01]", "[1]", "a[1][2]", "a b[1]", "a[1]x"] {
            assert!(StepKey::parse(bad).is_err(), "{bad}");
        }
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<StepKey>(&json).unwrap(), k);
    }

    #[test]
    fn generated_job_ids_parse() {
        let id = JobId::generate();
        assert_eq!(JobId::parse(id.as_str()).unwrap(), id);
    }
}
