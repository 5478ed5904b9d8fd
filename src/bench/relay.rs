//! A do-nothing HTTP relay (`ratepool relay`, not listed in `--help`): the
//! least any proxy in front of the provider does — take the request, send it
//! on over a pooled keep-alive connection, stream the answer back — and none
//! of ratepool's work. Figure 10 times it beside ratepool, so that what a
//! third process on a call's path costs this machine (its wake-ups on two
//! shared cores) is told apart from what ratepool itself adds.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::net::TcpListener;

/// The largest request body it passes on.
const MAX_BODY: usize = 16 << 20;

#[derive(Clone)]
struct Upstream {
    client: reqwest::Client,
    base: String,
}

/// Serves until the process is stopped, passing every request to `base`
/// (same method, path and query, `authorization` and `content-type`).
pub async fn serve(listener: TcpListener, base: &str) -> anyhow::Result<()> {
    let upstream = Upstream { client: reqwest::Client::new(), base: base.trim_end_matches('/').to_string() };
    let app = axum::Router::new().fallback(relay).with_state(upstream);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn relay(State(up): State<Upstream>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = up.client.request(parts.method, format!("{}{path}", up.base)).body(body);
    for name in [header::AUTHORIZATION, header::CONTENT_TYPE] {
        if let Some(v) = parts.headers.get(&name) {
            out = out.header(name, v);
        }
    }
    match out.send().await {
        Ok(resp) => {
            let mut answer = Response::builder().status(resp.status());
            if let Some(v) = resp.headers().get(header::CONTENT_TYPE) {
                answer = answer.header(header::CONTENT_TYPE, v);
            }
            answer
                .body(Body::from_stream(crate::api::calls::relay::chunks(resp)))
                .unwrap_or_else(|e| (StatusCode::BAD_GATEWAY, e.to_string()).into_response())
        }
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()).into_response(),
    }
}
