//! The Calls door: OpenAI's `POST /v1/chat/completions`,
//! `POST /v1/embeddings` and `GET /v1/models`, so an unmodified OpenAI SDK
//! works against the pool with `base_url = http://HOST/v1` and a tenant key.
//!
//! A call is checked whole before anything is charged or stored
//! ([`request`]), then sent through the same router, ledger, tenant quotas
//! and fallback orgs as a job step. Where a provider would answer 429, the
//! call waits for pooled capacity, up to `Ratepool-Max-Wait` seconds (or
//! `[calls] max_wait_secs`); past that it gets a 429 whose `retry-after`
//! says when capacity returns. Streams are relayed as they arrive
//! ([`relay`]). A call with an `Idempotency-Key` is durable ([`durable`]):
//! its answer is stored before it is returned, and the same key and body
//! get the stored answer without a provider call. Errors are OpenAI's
//! shape ([`error`]).

mod durable;
mod error;
pub(crate) mod relay;
mod request;

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::ApiState;
use crate::domain::{Micros, ModelName, OrgName};
use crate::engine::Router;
use crate::engine::router::{CallError, CallRequest, Routing};
use crate::provider::headers::rate_limit_header_map;
use crate::provider::{Endpoint, ProviderRequest};
use crate::storage::{AnswerKind, CallClaim, CallStore, StoredCall};
use durable::{CLAIM_MARGIN, Held, NextAction};
pub use error::OpenAiError;
use relay::{Relay, Transcript};

/// How the door behaves (`[calls]`, and `[workers] fallback_after_secs`).
#[derive(Debug, Clone)]
pub struct CallSettings {
    /// The wait of a call that sends no `Ratepool-Max-Wait`.
    pub default_wait: Duration,
    /// The longest wait a header may ask for.
    pub wait_cap: Duration,
    /// Largest request body, and largest answer stored for a durable call.
    pub max_body_bytes: usize,
    /// The completion allowance reserved when a request sets none.
    pub default_max_tokens: u64,
    /// How long a durable call's answer is kept.
    pub idempotency_ttl: Duration,
    /// How long a call waits for a primary org before fallback orgs may
    /// take it (no longer than its whole wait).
    pub fallback_after: Duration,
}

/// What the door needs besides the API's shared state.
pub struct CallsDoor {
    /// The pool's router; `None` where this API makes no provider calls
    /// (the Lambda), which answers the call routes with a 501.
    pub router: Option<Arc<Router>>,
    pub store: Arc<dyn CallStore>,
    pub settings: CallSettings,
}

/// The door's routes, merged into [`super::router`].
pub(super) fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/models", get(models))
}

const CHAT_PATH: &str = "/v1/chat/completions";
const EMBEDDINGS_PATH: &str = "/v1/embeddings";

fn label(endpoint: Endpoint) -> &'static str {
    match endpoint {
        Endpoint::ChatCompletions => "chat_completions",
        Endpoint::Embeddings => "embeddings",
    }
}

async fn chat_completions(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, Endpoint::ChatCompletions, &headers, body).await
}

async fn embeddings(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Response {
    answer(&state, Endpoint::Embeddings, &headers, body).await
}

async fn answer(state: &ApiState, endpoint: Endpoint, headers: &HeaderMap, body: Body) -> Response {
    match call(state, endpoint, headers, body).await {
        Ok(resp) => resp,
        Err(e) => {
            state.telemetry.door_call(label(endpoint), e.outcome);
            e.into_response()
        }
    }
}

/// Everything from the request to its answer; an `Err` is a refusal that
/// reached no org and charged nothing.
async fn call(state: &ApiState, endpoint: Endpoint, headers: &HeaderMap, body: Body) -> Result<Response, OpenAiError> {
    let tenant = super::authenticate(state, headers).await?;
    let door = &state.calls;
    let Some(router) = door.router.as_ref() else { return Err(OpenAiError::not_served_here()) };
    let body = super::read_body(headers, body, door.settings.max_body_bytes).await?;
    let key = super::idempotency_key(headers)?;
    let wait = request::max_wait(headers, door.settings.default_wait, door.settings.wait_cap)?;
    let path = match endpoint {
        Endpoint::ChatCompletions => CHAT_PATH,
        Endpoint::Embeddings => EMBEDDINGS_PATH,
    };
    let models = || -> Vec<String> { super::pool_models(&state.pool).into_iter().map(String::from).collect() };
    let parsed = request::parse(
        endpoint,
        path,
        &body,
        door.settings.default_max_tokens,
        &|m| router.serves(m),
        &models,
        key.is_some(),
    )?;
    let started = tokio::time::Instant::now();
    let (request_id, held) = match (key, parsed.hash) {
        (Some(key), Some(hash)) => {
            // The longest the call can take; a duplicate waits as long.
            let bound = wait + router.longest_timeout();
            let request_id = format!("call/{tenant}/{key}");
            let claim = CallClaim {
                tenant: tenant.clone(),
                key,
                request: hash,
                owner: uuid::Uuid::new_v4().simple().to_string(),
                until: state.clock.now().saturating_add(micros(bound + CLAIM_MARGIN)),
            };
            match durable::next_action(&door.store, &state.clock, claim, started + bound).await? {
                NextAction::Replay(answer) => {
                    return Ok(replay(state, router, &parsed.request.model, endpoint, answer));
                }
                NextAction::Start(held) => (request_id, Some(held)),
            }
        }
        _ => (format!("call/{tenant}/{}", uuid::Uuid::new_v4().simple()), None),
    };
    let req = CallRequest {
        tenant,
        request: parsed.request,
        request_id,
        gate: None,
        yield_to_tenant_quota: false,
        routing: Routing { cheap: false, fallback_after: door.settings.fallback_after.min(wait) },
        // What is left of it after waiting for a duplicate in flight.
        max_wait: Some(wait.saturating_sub(started.elapsed())),
    };
    let ctx = Ctx { state, router, endpoint, wait, allowance_param: parsed.allowance_param };
    match req.request.stream {
        Some(mode) => ctx.stream(&req, mode.usage_requested, held).await,
        None => ctx.whole(&req, held).await,
    }
}

fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// One call's surroundings, for the steps after its checks.
struct Ctx<'a> {
    state: &'a ApiState,
    router: &'a Router,
    endpoint: Endpoint,
    wait: Duration,
    allowance_param: &'static str,
}

impl Ctx<'_> {
    fn expires_at(&self, now: Micros) -> Micros {
        now.saturating_add(micros(self.state.calls.settings.idempotency_ttl))
    }

    /// A call answered whole: stored (if durable) before it is returned.
    async fn whole(&self, req: &CallRequest, held: Option<Held>) -> Result<Response, OpenAiError> {
        let result = self.router.call(req, &CancellationToken::new()).await;
        let name = label(self.endpoint);
        match result {
            Ok(r) => {
                self.state.telemetry.door_wait(name, r.waited);
                let answer = StoredCall {
                    status: 200,
                    kind: AnswerKind::Json,
                    org: Some(r.org.clone()),
                    body: r.body,
                    created_at: self.state.clock.now(),
                };
                self.store(held, &answer).await;
                self.state.telemetry.door_call(name, "ok");
                let mut resp = json_answer(StatusCode::OK, answer.body);
                self.decorate(&mut resp, &req.request.model, Some(&r.org), Some(r.waited));
                Ok(resp)
            }
            Err(e) => self.failed(req, e, held).await,
        }
    }

    /// A streamed call: relayed from the provider's first byte on.
    async fn stream(
        &self,
        req: &CallRequest,
        usage_requested: bool,
        held: Option<Held>,
    ) -> Result<Response, OpenAiError> {
        let open = match self.router.open(req, &CancellationToken::new()).await {
            Ok(open) => open,
            Err(e) => return self.failed(req, e, held).await,
        };
        self.state.telemetry.door_wait(label(self.endpoint), open.waited);
        let settings = &self.state.calls.settings;
        let transcript =
            held.map(|h| Transcript::new(h, open.org.clone(), settings.max_body_bytes, settings.idempotency_ttl));
        let relay = Relay::new(
            relay::events(open.response),
            open.read_timeout,
            usage_requested,
            open.record,
            transcript,
            self.state.clock.clone(),
            self.state.telemetry.clone(),
        );
        let mut resp = Response::new(Body::from_stream(relay.into_body()));
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        self.decorate(&mut resp, &req.request.model, Some(&open.org), Some(open.waited));
        Ok(resp)
    }

    /// Stores a durable call's answer; an answer that cannot be stored is
    /// still returned (a replay would then call again).
    async fn store(&self, held: Option<Held>, answer: &StoredCall) {
        let Some(held) = held else { return };
        if answer.body.len() > self.state.calls.settings.max_body_bytes {
            tracing::warn!(
                bytes = answer.body.len(),
                "answer larger than [calls] max_body_bytes: returned, not stored"
            );
            self.state.telemetry.durable_store_failed();
            held.release().await;
            return;
        }
        if let Err(e) = held.complete(answer, self.expires_at(answer.created_at)).await {
            tracing::warn!(error = %e, "a durable call's answer was not stored; a replay would call again");
            self.state.telemetry.durable_store_failed();
        }
    }

    /// A call the router did not answer with a success. A provider's
    /// refusal of the request is the request's own answer (stored, like a
    /// success); any other failure frees the key so a retry calls again.
    async fn failed(&self, req: &CallRequest, e: CallError, held: Option<Held>) -> Result<Response, OpenAiError> {
        let name = label(self.endpoint);
        if let CallError::Request { status, body, .. } = e {
            let answer =
                StoredCall { status, kind: AnswerKind::Json, org: None, body, created_at: self.state.clock.now() };
            self.store(held, &answer).await;
            self.state.telemetry.door_call(name, "provider_error");
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_REQUEST);
            let mut resp = json_answer(status, answer.body);
            self.decorate(&mut resp, &req.request.model, None, None);
            return Ok(resp);
        }
        if let Some(held) = held {
            held.release().await;
        }
        let error = self.refusal(&req.request, e);
        self.state.telemetry.door_call(name, error.outcome);
        let mut resp = error.into_response();
        self.decorate(&mut resp, &req.request.model, None, None);
        Ok(resp)
    }

    /// The answer to a router failure other than the provider's refusal.
    fn refusal(&self, request: &ProviderRequest, e: CallError) -> OpenAiError {
        let until = |at: Micros| Duration::from_micros((at - self.state.clock.now()).max(0) as u64);
        match e {
            // The second is never asked for here (calls wait for the tenant's quota).
            CallError::NoCapacity { retry_at } | CallError::TenantQuotaSpent { retry_at } => {
                OpenAiError::no_capacity(self.wait, until(retry_at))
            }
            CallError::Unavailable { retry_at, reason } => OpenAiError::unavailable(until(retry_at), &reason),
            CallError::Exhausted { attempts, last } => OpenAiError::upstream(format!(
                "The provider failed {attempts} attempts of this call before its wait ran out; the last: {last}."
            )),
            CallError::TooLarge { tokens, largest, model } => {
                // Name the part of the request that makes it too large.
                let param = if request.reservation.completion_tokens >= largest {
                    self.allowance_param
                } else {
                    match self.endpoint {
                        Endpoint::ChatCompletions => "messages",
                        Endpoint::Embeddings => "input",
                    }
                };
                OpenAiError::invalid(
                    param,
                    format!(
                        "This request reserves {tokens} tokens (the prompt estimate plus the completion allowance \
                         times n), more than any org serving {model} admits in a minute (at most {largest} \
                         tokens per minute); reduce '{param}'."
                    ),
                )
            }
            CallError::Unroutable(message) => OpenAiError::invalid("model", message),
            CallError::Request { message, .. } => OpenAiError::upstream(message),
            CallError::Storage(e) => OpenAiError::storage(&e.to_string()),
            CallError::Cancelled => OpenAiError::unavailable(Duration::from_secs(1), "The call was cancelled"),
        }
    }

    /// The pool's `x-ratelimit-*` headers for the model, and which org
    /// answered after how long a wait.
    fn decorate(&self, resp: &mut Response, model: &ModelName, org: Option<&OrgName>, waited: Option<Duration>) {
        decorate(resp, self.router, model, org, waited);
    }
}

fn decorate(resp: &mut Response, router: &Router, model: &ModelName, org: Option<&OrgName>, waited: Option<Duration>) {
    let h = resp.headers_mut();
    if let Some(limits) = router.pool_limits(model) {
        h.extend(rate_limit_header_map(&limits));
    }
    if let Some(org) = org.and_then(|o| HeaderValue::from_str(o.as_str()).ok()) {
        h.insert("x-ratepool-org", org);
    }
    if let Some(waited) = waited {
        h.insert("x-ratepool-wait-ms", HeaderValue::from(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)));
    }
}

fn json_answer(status: StatusCode, body: Bytes) -> Response {
    let mut resp = (status, body).into_response();
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// A stored answer, sent again: as it was (status, JSON or the events of
/// the stream), marked `idempotent-replayed: true`.
fn replay(state: &ApiState, router: &Router, model: &ModelName, endpoint: Endpoint, answer: StoredCall) -> Response {
    state.telemetry.door_call(label(endpoint), "replayed");
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = match answer.kind {
        AnswerKind::Json => json_answer(status, answer.body),
        AnswerKind::EventStream => {
            let mut resp = (status, answer.body).into_response();
            let h = resp.headers_mut();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            resp
        }
    };
    resp.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    decorate(&mut resp, router, model, answer.org.as_ref(), None);
    resp
}

/// `GET /v1/models`: the models the pool serves, in OpenAI's list shape.
async fn models(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Err(e) = super::authenticate(&state, &headers).await {
        return OpenAiError::from(e).into_response();
    }
    let data: Vec<_> = super::pool_models(&state.pool)
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "ratepool"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}
