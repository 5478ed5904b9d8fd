//! `ratepool sim`: an OpenAI-compatible provider simulator for tests, demos
//! and capacity planning.
//!
//! It impersonates several organizations, each with per-model RPM/TPM limits
//! enforced the way OpenAI documents them (continuously refilling buckets,
//! charged at arrival with prompt estimate + max_tokens, a refused call
//! charges nothing), answers with deterministic text so reruns are
//! comparable, injects seeded faults (5xx, dropped connections, stalls), and
//! keeps the books a test needs: who was admitted how often, and the busiest
//! minute of every (org, model) against what its limits allow.
//!
//! Checks run in this order, like the real provider's:
//! auth → parse → model → down (503) → injected faults → insufficient_quota
//! → slow-down (503 "Slow Down" above a rate set at run time) → rate limit
//! → latency → answer.

mod config;
mod json;
mod limits;
mod stats;
mod stream;
mod text;
mod wire;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::domain::{Clock, Micros};
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Decision, Rate};

pub use config::{DEFAULT_LISTEN, FaultConfig, LatencyConfig, SimConfig, SimLimits, SimOrg};
pub use stats::{ModelStats, OrgStats, SimStats};

use config::FaultPatch;
use limits::{LimitKind, ModelLimiter};
use stats::RequestLedger;
use wire::ApiError;

/// A handle on one running simulator; clones share its state.
#[derive(Clone)]
pub struct Simulator {
    inner: Arc<Inner>,
}

struct Inner {
    clock: Arc<dyn Clock>,
    latency: LatencyConfig,
    chars_per_token: f64,
    /// API key → index into `Shared::orgs`; orgs are never added or removed,
    /// so an index found here is always valid.
    keys: HashMap<String, usize>,
    /// Every chat request received; outside the lock because it is counted
    /// before anything else is known.
    total_calls: AtomicU64,
    /// Streamed answers whose client went away before their last event.
    streams_cut: Arc<AtomicU64>,
    /// Never held across an `.await`.
    state: Mutex<Shared>,
    /// Cancelled when [`serve`] shuts down, so calls sleeping through their
    /// latency or a stall end (as dropped connections) instead of holding
    /// the graceful shutdown open.
    closing: CancellationToken,
}

struct Shared {
    orgs: Vec<OrgState>,
    faults: FaultConfig,
    /// One draw per request that reaches fault injection, so a given seed
    /// and arrival order replay the same faults.
    rng: StdRng,
    requests: RequestLedger,
}

struct OrgState {
    name: String,
    down: bool,
    insufficient_quota: bool,
    /// While set, requests above this rate get 503 "Slow Down".
    slow_down: Option<SlowDown>,
    /// While set, every request gets a 429 on a per-day limit with this
    /// retry hint (ms): a limit that does not clear however often it is
    /// retried.
    day_limit_retry_ms: Option<u64>,
    models: BTreeMap<String, ModelLimiter>,
    /// The counters; `models` in here stays empty (filled from the limiters
    /// when stats are read).
    counts: OrgStats,
}

/// The rate an org in slow-down still serves: requests per minute with
/// about a second of burst, so what is above the rate is refused at once
/// rather than after a minute's allowance.
struct SlowDown {
    rpm: u64,
    params: BucketParams,
    bucket: BucketState,
}

impl SlowDown {
    fn new(rpm: u64) -> Self {
        let requests = Rate::per_minute(rpm.max(1));
        let tolerance_us = requests.increment(1).max(1_000_000);
        let params = BucketParams { requests: Rate { tolerance_us, ..requests }, tokens: Rate::per_minute(1) };
        Self { rpm, params, bucket: BucketState::default() }
    }

    /// Takes one request's room, or says it is over the rate.
    fn admits(&mut self, now: Micros) -> bool {
        match gcra::decide(self.bucket, &self.params, Cost { requests: 1, tokens: 0 }, now) {
            Decision::Allow(next) => {
                self.bucket = next;
                true
            }
            Decision::Deny { .. } | Decision::Never => false,
        }
    }
}

enum Fault {
    ServerError(StatusCode),
    Drop,
    Stall(Duration),
}

impl Shared {
    fn draw_fault(faults: &FaultConfig, rng: &mut StdRng) -> Option<Fault> {
        let u: f64 = rng.random();
        let mut edge = faults.server_error_rate;
        if u < edge {
            let status = match rng.random_range(0..3u8) {
                0 => StatusCode::INTERNAL_SERVER_ERROR,
                1 => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            return Some(Fault::ServerError(status));
        }
        edge += faults.drop_rate;
        if u < edge {
            return Some(Fault::Drop);
        }
        edge += faults.stall_rate;
        if u < edge {
            return Some(Fault::Stall(Duration::from_millis(faults.stall_ms)));
        }
        None
    }
}

impl Simulator {
    /// Builds a simulator; `config` is taken as valid (see
    /// [`SimConfig::from_toml`]). If two orgs share a key the first wins.
    pub fn new(config: SimConfig, clock: Arc<dyn Clock>) -> Self {
        let mut keys = HashMap::new();
        let orgs = config
            .orgs
            .iter()
            .enumerate()
            .map(|(i, o)| {
                keys.entry(o.api_key.clone()).or_insert(i);
                OrgState {
                    name: o.name.clone(),
                    down: o.down,
                    insufficient_quota: o.insufficient_quota,
                    slow_down: None,
                    day_limit_retry_ms: None,
                    models: o.models.iter().map(|(m, l)| (m.clone(), ModelLimiter::new(*l))).collect(),
                    counts: OrgStats::default(),
                }
            })
            .collect();
        let state = Shared {
            orgs,
            faults: config.faults,
            rng: StdRng::seed_from_u64(config.seed),
            requests: RequestLedger::default(),
        };
        Self {
            inner: Arc::new(Inner {
                clock,
                latency: config.latency,
                chars_per_token: config.chars_per_token,
                keys,
                total_calls: AtomicU64::new(0),
                streams_cut: Arc::new(AtomicU64::new(0)),
                state: Mutex::new(state),
                closing: CancellationToken::new(),
            }),
        }
    }

    /// The OpenAI routes (chat completions, embeddings, models; with and
    /// without the `/v1` prefix) and the `/_sim/*` control routes.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/chat/completions", post(chat))
            .route("/v1/embeddings", post(embeddings))
            .route("/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .route("/models", get(models))
            .route("/_sim/stats", get(get_stats))
            .route("/_sim/requests", get(get_requests))
            .route("/_sim/attempts", get(get_attempts))
            .route("/_sim/orgs/{name}", post(update_org))
            .route("/_sim/faults", post(update_faults))
            .with_state(self.clone())
    }

    /// What `GET /_sim/stats` returns.
    pub fn stats(&self) -> SimStats {
        let st = self.inner.lock();
        let mut s = SimStats {
            total_calls: self.inner.total_calls.load(Ordering::Relaxed),
            streams_cut: self.inner.streams_cut.load(Ordering::Relaxed),
            ..SimStats::default()
        };
        st.requests.fill(&mut s);
        for o in &st.orgs {
            let mut os = o.counts.clone();
            os.models = o.models.iter().map(|(m, l)| (m.clone(), l.stats())).collect();
            s.orgs.insert(o.name.clone(), os);
        }
        s
    }
}

/// Serves `sim` on `listener` until `shutdown` resolves; calls still
/// sleeping then are cut off as dropped connections.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sim: Simulator,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let closing = sim.inner.closing.clone();
    let app = sim.router();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            closing.cancel();
        })
        .await
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves counters, never broken
        // invariants, so the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<usize, ApiError> {
        let Some(auth) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(ApiError::invalid_api_key(
                "You didn't provide an API key. You need to provide your API key in an Authorization header \
                 using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                    .into(),
            ));
        };
        let key = auth.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
        key.and_then(|k| self.keys.get(k).copied())
            .ok_or_else(|| ApiError::invalid_api_key("Incorrect API key provided.".into()))
    }

    /// Sleeps `d` unless the server is shutting down; false if it is.
    async fn pause(&self, d: Duration) -> bool {
        if d.is_zero() {
            return !self.closing.is_cancelled();
        }
        tokio::select! {
            () = tokio::time::sleep(d) => true,
            () = self.closing.cancelled() => false,
        }
    }

    fn latency(&self, completion_tokens: u64) -> Duration {
        let l = &self.latency;
        let ms = (l.base_ms + l.per_token_ms * completion_tokens as f64) * l.time_scale;
        Duration::try_from_secs_f64(ms / 1_000.0).unwrap_or(Duration::ZERO)
    }

    /// Everything between a parsed request and its answer, as the real
    /// provider does it: the model, an outage, injected faults, billing,
    /// slow-down and the rate limiter (both buckets taken at arrival, or
    /// nothing). `Ok` carries the rate-limit headers after the charge.
    async fn admit(&self, org: usize, call: &Admission<'_>, headers: &HeaderMap, body: &[u8]) -> Result<(), Response> {
        self.lock().requests.attempt(&request_id(headers, body));
        let stall = {
            let mut guard = self.lock();
            let Shared { orgs, faults, rng, .. } = &mut *guard;
            let o = &mut orgs[org];
            let Some(limiter) = o.models.get(call.model) else {
                return Err(ApiError::model_not_found(call.model).into_response());
            };
            let headers = wire::ratelimit_headers(&limiter.snapshot(self.clock.now()));
            if o.down {
                o.counts.unavailable += 1;
                return Err((headers, ApiError::server_error(StatusCode::SERVICE_UNAVAILABLE)).into_response());
            }
            match Shared::draw_fault(faults, rng) {
                None => None,
                Some(Fault::ServerError(status)) => {
                    o.counts.server_errors += 1;
                    tracing::debug!(org = %o.name, %status, "sim: injected server error");
                    return Err((headers, ApiError::server_error(status)).into_response());
                }
                Some(Fault::Drop) => {
                    o.counts.dropped += 1;
                    tracing::debug!(org = %o.name, "sim: injected dropped connection");
                    return Err(dropped_connection());
                }
                Some(Fault::Stall(d)) => {
                    o.counts.stalled += 1;
                    tracing::debug!(org = %o.name, ?d, "sim: injected stall");
                    Some(d)
                }
            }
        };
        if let Some(d) = stall
            && !self.pause(d).await
        {
            return Err(dropped_connection());
        }

        let mut guard = self.lock();
        let Shared { orgs, requests, .. } = &mut *guard;
        let o = &mut orgs[org];
        let Some(limiter) = o.models.get_mut(call.model) else {
            return Err(ApiError::model_not_found(call.model).into_response());
        };
        let now = self.clock.now();
        if o.insufficient_quota {
            o.counts.insufficient_quota += 1;
            let headers = wire::ratelimit_headers(&limiter.snapshot(now));
            return Err((headers, ApiError::insufficient_quota()).into_response());
        }
        if let Some(ms) = o.day_limit_retry_ms {
            o.counts.rate_limited_requests += 1;
            let mut headers = wire::ratelimit_headers(&limiter.snapshot(now));
            let wait = i64::try_from(ms.saturating_mul(1_000)).unwrap_or(i64::MAX);
            headers.extend(wire::retry_headers(wait));
            return Err((headers, ApiError::day_limit_reached(call.model, &o.name, ms)).into_response());
        }
        if let Some(slow) = o.slow_down.as_mut()
            && !slow.admits(now)
        {
            o.counts.slowed_down += 1;
            let headers = wire::ratelimit_headers(&limiter.snapshot(now));
            return Err((headers, ApiError::slow_down()).into_response());
        }
        if let Err(refusal) = limiter.try_take(call.cost, now) {
            match refusal.kind {
                LimitKind::Requests => o.counts.rate_limited_requests += 1,
                LimitKind::Tokens => o.counts.rate_limited_tokens += 1,
            }
            let mut headers = wire::ratelimit_headers(&limiter.snapshot(now));
            if let Some(wait) = refusal.retry_after {
                headers.extend(wire::retry_headers(wait));
            }
            return Err((headers, ApiError::rate_limited(&refusal, call.model, &o.name)).into_response());
        }
        o.counts.accepted_calls += 1;
        o.counts.accepted_prompt_tokens += call.prompt_tokens;
        o.counts.accepted_completion_tokens += call.completion_tokens;
        o.counts.charged_tokens += call.cost.tokens;
        requests.record(&request_id(headers, body));
        Ok(())
    }

    /// The rate-limit headers of (org, model) now: when the answer leaves,
    /// so a client that reads "remaining"/"reset" relative to receipt is
    /// not misled by the generation time.
    fn headers_now(&self, org: usize, model: &str) -> HeaderMap {
        let st = self.lock();
        match st.orgs[org].models.get(model) {
            Some(l) => wire::ratelimit_headers(&l.snapshot(self.clock.now())),
            None => HeaderMap::new(),
        }
    }

    async fn chat(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        self.total_calls.fetch_add(1, Ordering::Relaxed);
        let org = match self.authenticate(headers) {
            Ok(org) => org,
            Err(e) => return e.into_response(),
        };
        let call = match wire::parse_chat(body) {
            Ok(call) => call,
            Err(e) => return e.into_response(),
        };
        let answer = call.answer();
        let prompt_tokens = call.prompt_tokens(self.chars_per_token);
        let admission = Admission {
            model: &call.model,
            cost: call.reservation.cost(self.chars_per_token),
            prompt_tokens,
            completion_tokens: answer.tokens(),
        };
        if let Err(refused) = self.admit(org, &admission, headers, body).await {
            return refused;
        }
        let created = self.clock.now().div_euclid(1_000_000);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": answer.tokens(),
            "total_tokens": prompt_tokens + answer.tokens(),
        });
        if let Some(include_usage) = call.stream {
            let chunks = stream::chunks(&call, &answer, created, include_usage.then_some(&usage));
            let paced = stream::paced(chunks, self.latency(0), self.latency(1).saturating_sub(self.latency(0)));
            let headers = self.headers_now(org, &call.model);
            return stream::response(headers, paced, self.closing.clone(), self.streams_cut.clone());
        }
        // Generation time, after admission as at the real provider.
        if !self.pause(self.latency(answer.tokens())).await {
            return dropped_connection();
        }
        let choices: Vec<_> = answer
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"index": i, "message": c.message(), "logprobs": null, "finish_reason": c.finish_reason}))
            .collect();
        let body = json!({
            "id": answer.id,
            "object": "chat.completion",
            "created": created,
            "model": call.model,
            "choices": choices,
            "usage": usage,
        });
        (self.headers_now(org, &call.model), Json(body)).into_response()
    }

    async fn embeddings(&self, headers: &HeaderMap, body: &[u8]) -> Response {
        self.total_calls.fetch_add(1, Ordering::Relaxed);
        let org = match self.authenticate(headers) {
            Ok(org) => org,
            Err(e) => return e.into_response(),
        };
        let call = match wire::parse_embeddings(body) {
            Ok(call) => call,
            Err(e) => return e.into_response(),
        };
        let cost = call.reservation.cost(self.chars_per_token);
        let admission = Admission { model: &call.model, cost, prompt_tokens: cost.tokens, completion_tokens: 0 };
        if let Err(refused) = self.admit(org, &admission, headers, body).await {
            return refused;
        }
        if !self.pause(self.latency(0)).await {
            return dropped_connection();
        }
        let data: Vec<_> = call
            .inputs
            .iter()
            .enumerate()
            .map(|(i, input)| {
                json!({"object": "embedding", "index": i, "embedding": text::embedding(&call.model, input, call.dimensions)})
            })
            .collect();
        let body = json!({
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": cost.tokens, "total_tokens": cost.tokens},
        });
        (self.headers_now(org, &call.model), Json(body)).into_response()
    }

    /// The models the key's org serves, as `GET /v1/models` lists them.
    fn models(&self, headers: &HeaderMap) -> Response {
        let org = match self.authenticate(headers) {
            Ok(org) => org,
            Err(e) => return e.into_response(),
        };
        let st = self.lock();
        let o = &st.orgs[org];
        let data: Vec<_> =
            o.models.keys().map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": o.name})).collect();
        Json(json!({"object": "list", "data": data})).into_response()
    }
}

/// What one call takes from its org, for [`Inner::admit`].
struct Admission<'a> {
    model: &'a str,
    cost: Cost,
    prompt_tokens: u64,
    completion_tokens: u64,
}

/// The id a call is counted under: the client's `X-Client-Request-Id`
/// (OpenAI accepts it for the same purpose), else a hash of the body.
fn request_id(headers: &HeaderMap, body: &[u8]) -> String {
    match headers.get("x-client-request-id").and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_owned(),
        _ => hex::encode(Sha256::digest(body)),
    }
}

/// A response whose body fails before its first byte: hyper then closes the
/// connection without writing anything, so the client sees a connection
/// error, not an HTTP answer — what a provider crash or a cut network does.
fn dropped_connection() -> Response {
    let failing = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::other("connection dropped by the simulator"))
    });
    Response::new(Body::from_stream(failing))
}

async fn chat(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    sim.inner.chat(&headers, &body).await
}

async fn embeddings(State(sim): State<Simulator>, headers: HeaderMap, body: Bytes) -> Response {
    sim.inner.embeddings(&headers, &body).await
}

async fn models(State(sim): State<Simulator>, headers: HeaderMap) -> Response {
    sim.inner.models(&headers)
}

async fn get_stats(State(sim): State<Simulator>) -> Json<SimStats> {
    Json(sim.stats())
}

async fn get_requests(State(sim): State<Simulator>) -> Json<BTreeMap<String, u64>> {
    Json(sim.inner.lock().requests.counts())
}

/// Every request per `X-Client-Request-Id`, whatever its answer (faults,
/// 429s and 503s included), where `/_sim/requests` counts accepted ones.
async fn get_attempts(State(sim): State<Simulator>) -> Json<BTreeMap<String, u64>> {
    Json(sim.inner.lock().requests.attempts())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrgPatch {
    down: Option<bool>,
    insufficient_quota: Option<bool>,
    /// Absent: unchanged; `null`: no slow-down; a number: answer 503 "Slow
    /// Down" to requests above that many per minute.
    #[serde(default, deserialize_with = "present")]
    slow_down_rpm: Option<Option<u64>>,
    /// Absent: unchanged; `null`: off; a number: answer every request with
    /// a 429 on requests per day whose retry hint is that many ms.
    #[serde(default, deserialize_with = "present")]
    day_limit_retry_ms: Option<Option<u64>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one left out (`None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

#[derive(Debug, Serialize)]
struct OrgStatus {
    name: String,
    down: bool,
    insufficient_quota: bool,
    slow_down_rpm: Option<u64>,
}

fn bad_control_request(e: impl std::fmt::Display) -> Response {
    ApiError::invalid_request(e.to_string(), None, None).into_response()
}

async fn update_org(State(sim): State<Simulator>, Path(name): Path<String>, body: Bytes) -> Response {
    let patch: OrgPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad_control_request(e),
    };
    let mut st = sim.inner.lock();
    let Some(o) = st.orgs.iter_mut().find(|o| o.name == name) else {
        let e = ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no org named {name:?}"),
            kind: "invalid_request_error",
            param: None,
            code: None,
        };
        return e.into_response();
    };
    if let Some(down) = patch.down {
        o.down = down;
    }
    if let Some(q) = patch.insufficient_quota {
        o.insufficient_quota = q;
    }
    if let Some(rpm) = patch.slow_down_rpm {
        o.slow_down = rpm.map(SlowDown::new);
    }
    if let Some(ms) = patch.day_limit_retry_ms {
        o.day_limit_retry_ms = ms;
    }
    let slow_down_rpm = o.slow_down.as_ref().map(|s| s.rpm);
    tracing::info!(org = %o.name, down = o.down, insufficient_quota = o.insufficient_quota, ?slow_down_rpm, "sim: org updated");
    Json(OrgStatus { name: o.name.clone(), down: o.down, insufficient_quota: o.insufficient_quota, slow_down_rpm })
        .into_response()
}

async fn update_faults(State(sim): State<Simulator>, body: Bytes) -> Response {
    let patch: FaultPatch = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => return bad_control_request(e),
    };
    let mut st = sim.inner.lock();
    match st.faults.patched(&patch) {
        Ok(next) => {
            st.faults = next;
            tracing::info!(faults = ?next, "sim: faults updated");
            Json(next).into_response()
        }
        Err(e) => bad_control_request(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests;
