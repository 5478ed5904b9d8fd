//! The CLI's HTTP client: `ratepool submit`, `status`, `result`.

use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

impl ApiClient {
    pub fn new(base: &str, key: SecretString) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(Self { http, base: base.trim_end_matches('/').to_string(), key })
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let resp = req
            .bearer_auth(self.key.expose_secret())
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            let msg = body["error"]["message"].as_str().unwrap_or("no error message");
            match body["error"]["field"].as_str() {
                Some(field) => bail!("{status}: {field}: {msg}"),
                None => bail!("{status}: {msg}"),
            }
        }
        Ok(body)
    }

    pub async fn submit(&self, spec: Vec<u8>, idempotency_key: Option<&str>) -> anyhow::Result<Value> {
        let mut req =
            self.http.post(format!("{}/v1/jobs", self.base)).header("content-type", "application/json").body(spec);
        if let Some(k) = idempotency_key {
            req = req.header("idempotency-key", k);
        }
        self.send(req).await
    }

    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        self.send(self.http.get(format!("{}/v1/jobs/{id}", self.base))).await
    }

    /// The whole result: every page, merged into one (`next` null).
    pub async fn result(&self, id: &str) -> anyhow::Result<Value> {
        let url = format!("{}/v1/jobs/{id}/result", self.base);
        let mut whole = self.send(self.http.get(&url)).await?;
        while let Some(after) = whole["next"].as_str().map(str::to_owned) {
            let next = url::Url::parse_with_params(&url, [("after", &after)]).context("the result's page URL")?;
            let page = self.send(self.http.get(next)).await?;
            for part in ["outputs", "messages"] {
                if let (Some(into), Some(from)) = (whole[part].as_object_mut(), page[part].as_object()) {
                    into.extend(from.iter().map(|(k, v)| (k.clone(), v.clone())));
                }
            }
            whole["next"] = page["next"].clone();
        }
        Ok(whole)
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<Value> {
        self.send(self.http.post(format!("{}/v1/jobs/{id}/cancel", self.base))).await
    }

    /// Polls the job until it is final, drawing a progress bar on stderr.
    pub async fn wait(&self, id: &str) -> anyhow::Result<Value> {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} steps  {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        loop {
            let job = self.status(id).await?;
            bar.set_length(job["steps_total"].as_u64().unwrap_or(0));
            bar.set_position(job["steps_done"].as_u64().unwrap_or(0));
            let status = job["status"].as_str().unwrap_or("unknown").to_string();
            bar.set_message(format!("{status}, {} tokens", job["usage"]["total_tokens"].as_u64().unwrap_or(0)));
            if matches!(status.as_str(), "succeeded" | "failed" | "cancelled") {
                bar.finish();
                return Ok(job);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
