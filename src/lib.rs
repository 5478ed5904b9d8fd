//! ratepool: durable chains of LLM calls spread over the rate limits of
//! several provider organizations.
//!
//! - [`spec`]: the job spec, its validation, templates and DAG.
//! - [`engine`]: workers, the scheduler, the router and its quota ledger use.
//! - [`provider`]: the OpenAI-compatible client and its header parsing.
//! - [`storage`]: the traits every backend implements; [`local`] is the
//!   one-machine backend (SQLite).
//! - [`api`]: the HTTP API (axum), shared by `ratepool serve` and the Lambda.
//! - [`sim`]: the provider simulator (`ratepool sim`); [`bench`]: the
//!   benchmark (`ratepool bench`).
//! - [`answer`]: a step's answer (every choice's message), as checkpoints
//!   keep it.
//! - [`config`], [`client`], [`telemetry`]: configuration, the CLI's HTTP
//!   client, logging and Prometheus metrics.
//! - [`dlq`]: `ratepool dlq`, the operator's commands on the dead-letter queue.
//! - [`webhook`]: signed, retried job webhooks; [`ssrf`]: the guard on the
//!   URLs they go to; [`backoff`]: the jittered backoff every retry uses.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic))]

pub mod answer;
pub mod api;
pub mod aws;
pub mod backoff;
pub mod bench;
pub mod client;
pub mod config;
pub mod dlq;
pub mod domain;
pub mod engine;
pub mod lambda;
pub mod local;
pub mod postgres;
pub mod provider;
pub mod serve;
pub mod sim;
pub mod spec;
pub mod ssrf;
pub mod storage;
pub mod telemetry;
pub mod webhook;
pub mod worker;
