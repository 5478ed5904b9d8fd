//! What the simulator saw, for tests and capacity reports: per-org counters,
//! per-model peak usage against the limits, and how often each request id
//! was accepted — the evidence that a crashed run repeated at most the calls
//! that were in flight.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `GET /_sim/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SimStats {
    /// Every chat request received, whatever its answer.
    pub total_calls: u64,
    /// Streamed answers whose client went away (closed the connection)
    /// before the last event.
    #[serde(default)]
    pub streams_cut: u64,
    /// Request ids accepted at least once.
    pub distinct_requests: u64,
    /// Request ids accepted more than once.
    pub duplicate_requests: u64,
    /// The first 100 ids to be accepted a second time, in that order.
    pub requests_accepted_more_than_once: Vec<String>,
    pub orgs: BTreeMap<String, OrgStats>,
}

/// One org's counters. "Accepted" means admitted by the limiter: like the
/// provider, the simulator has committed (and billed) the call at that point,
/// even if the client goes away before the answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgStats {
    pub accepted_calls: u64,
    pub accepted_prompt_tokens: u64,
    pub accepted_completion_tokens: u64,
    /// Tokens taken from the TPM bucket: prompt estimate + max_tokens.
    pub charged_tokens: u64,
    /// 429 answers of type `requests` (RPM).
    pub rate_limited_requests: u64,
    /// 429 answers of type `tokens` (TPM).
    pub rate_limited_tokens: u64,
    pub insufficient_quota: u64,
    /// Injected 5xx answers.
    pub server_errors: u64,
    /// Connections closed without an answer.
    pub dropped: u64,
    pub stalled: u64,
    /// 503 answers while the org was down.
    pub unavailable: u64,
    /// 503 "Slow Down" answers to requests above the org's slow-down rate.
    #[serde(default)]
    pub slowed_down: u64,
    pub models: BTreeMap<String, ModelStats>,
}

/// One (org, model)'s limits and the most it ever admitted in 60 s.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelStats {
    pub rpm: u64,
    pub tpm: u64,
    /// Most requests admitted in any sliding 60-second window.
    pub peak_60s_requests: u64,
    /// Most tokens charged in any sliding 60-second window.
    pub peak_60s_tokens: u64,
    /// The most a continuous-refill bucket can legitimately admit in 60 s:
    /// a full minute's burst plus a minute of refill, `2 × rpm`. A peak
    /// above this means the limiter is broken, not the client.
    pub window_bound_requests: u64,
    /// `2 × tpm`, as for requests.
    pub window_bound_tokens: u64,
}

/// How many times each request id was accepted, and received at all.
#[derive(Debug, Default)]
pub(super) struct RequestLedger {
    counts: HashMap<String, u64>,
    /// Every request that named the id, whatever its answer: what a retry
    /// storm would inflate.
    attempts: HashMap<String, u64>,
    duplicates: u64,
    first_duplicates: Vec<String>,
}

const MAX_LISTED_DUPLICATES: usize = 100;

impl RequestLedger {
    pub(super) fn record(&mut self, id: &str) {
        let n = match self.counts.get_mut(id) {
            Some(n) => {
                *n += 1;
                *n
            }
            None => {
                self.counts.insert(id.to_owned(), 1);
                1
            }
        };
        if n == 2 {
            self.duplicates += 1;
            if self.first_duplicates.len() < MAX_LISTED_DUPLICATES {
                self.first_duplicates.push(id.to_owned());
            }
        }
    }

    pub(super) fn attempt(&mut self, id: &str) {
        match self.attempts.get_mut(id) {
            Some(n) => *n += 1,
            None => {
                self.attempts.insert(id.to_owned(), 1);
            }
        }
    }

    pub(super) fn attempts(&self) -> BTreeMap<String, u64> {
        self.attempts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    pub(super) fn counts(&self) -> BTreeMap<String, u64> {
        self.counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Fills the top-level request fields of `stats`.
    pub(super) fn fill(&self, stats: &mut SimStats) {
        stats.distinct_requests = self.counts.len() as u64;
        stats.duplicate_requests = self.duplicates;
        stats.requests_accepted_more_than_once = self.first_duplicates.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_counts_duplicates_once_each_in_order() {
        let mut l = RequestLedger::default();
        for id in ["a", "b", "b", "c", "b", "a"] {
            l.record(id);
        }
        let mut s = SimStats::default();
        l.fill(&mut s);
        assert_eq!((s.distinct_requests, s.duplicate_requests), (3, 2));
        assert_eq!(s.requests_accepted_more_than_once, vec!["b".to_owned(), "a".to_owned()]);
        assert_eq!(l.counts()["b"], 3);
    }
}
