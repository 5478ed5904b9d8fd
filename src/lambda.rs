//! The API behind API Gateway. `lambda_http` turns a REST proxy event
//! (multi-value headers and query strings, base64 bodies included) into an
//! HTTP request for the same axum router `ratepool serve` uses, and its
//! answer back into the proxy response. No route, check or body is
//! implemented twice.

use lambda_http::request::LambdaRequest;
use lambda_http::{Adapter, Context, LambdaEvent, RequestExt, Service};
use tower::ServiceBuilder;
use tower::util::MapRequest;

/// Serves `app` on the Lambda Runtime API until the container is retired.
pub async fn run(app: axum::Router) -> Result<(), lambda_http::Error> {
    lambda_http::run(at_raw_paths(app)).await
}

fn at_raw_paths(app: axum::Router) -> MapRequest<axum::Router, fn(lambda_http::Request) -> lambda_http::Request> {
    ServiceBuilder::new().map_request(at_raw_path as fn(lambda_http::Request) -> lambda_http::Request).service(app)
}

/// The path the client asked for. lambda_http puts API Gateway's stage in
/// front of it (`/prod/v1/jobs`) unless an environment variable says not
/// to; the stage is not part of the API, so the router gets the event's own
/// path, whatever the environment.
fn at_raw_path(mut req: lambda_http::Request) -> lambda_http::Request {
    let raw = req.raw_http_path();
    if raw.is_empty() || raw == req.uri().path() {
        return req;
    }
    let path_and_query = match req.uri().query() {
        Some(q) => format!("{raw}?{q}"),
        None => raw.to_string(),
    };
    let mut parts = req.uri().clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    }
    req
}

/// Answers one invocation as [`run`] does, through the same adapter: the
/// event JSON Lambda delivers in, the response JSON Lambda returns out. For
/// tests and tools that drive the handler without the Runtime API.
pub async fn invoke(app: axum::Router, event: serde_json::Value) -> Result<serde_json::Value, String> {
    let request: LambdaRequest = serde_json::from_value(event).map_err(|e| format!("not a Lambda HTTP event: {e}"))?;
    let mut adapter = Adapter::from(at_raw_paths(app));
    let response = match adapter.call(LambdaEvent::new(request, Context::default())).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    serde_json::to_value(response).map_err(|e| format!("response: {e}"))
}

#[cfg(test)]
mod tests {
    use axum::routing::post;
    use serde_json::json;

    use super::*;

    /// What the event carries reaches the router: repeated query parameters
    /// whole, a base64 body decoded, the path without the stage; and a
    /// header the router answers twice leaves in `multiValueHeaders` with
    /// both values (the hand-written adapter this replaced kept one). A
    /// repeated request header arrives as its last value: lambda_http lays
    /// `headers` over `multiValueHeaders`; no header the API reads repeats.
    #[tokio::test]
    async fn multi_value_queries_and_answers_base64_bodies_and_the_stage_reach_the_router() {
        let app = axum::Router::new().route(
            "/v1/echo",
            post(|headers: http::HeaderMap, uri: http::Uri, body: String| async move {
                let tag = headers.get("x-tag").and_then(|v| v.to_str().ok()).map(str::to_string);
                let answer = axum::Json(json!({"tag": tag, "query": uri.query(), "body": body}));
                (axum::response::AppendHeaders([("x-seen", "one"), ("x-seen", "two")]), answer)
            }),
        );
        let mut event: serde_json::Value =
            serde_json::from_str(include_str!("../tests/fixtures/apigw_proxy_event.json")).unwrap();
        assert_eq!(event["requestContext"]["stage"], "prod");
        event["httpMethod"] = json!("POST");
        event["path"] = json!("/v1/echo");
        event["multiValueHeaders"]["X-Tag"] = json!(["a", "b"]);
        event["headers"]["X-Tag"] = json!("b");
        event["multiValueQueryStringParameters"] = json!({"k": ["1", "2"]});
        event["queryStringParameters"] = json!({"k": "2"});
        event["body"] = json!("aGVsbG8=");
        event["isBase64Encoded"] = json!(true);

        let resp = invoke(app, event).await.unwrap();
        assert_eq!(resp["statusCode"], 200, "{resp}");
        assert_eq!(resp["multiValueHeaders"]["x-seen"], json!(["one", "two"]), "{resp}");
        let body: serde_json::Value = serde_json::from_str(resp["body"].as_str().unwrap()).unwrap();
        assert_eq!(body, json!({"tag": "b", "query": "k=1&k=2", "body": "hello"}));
    }

    #[tokio::test]
    async fn an_event_that_is_not_an_http_event_is_refused() {
        let err = invoke(axum::Router::new(), json!({"hello": "world"})).await.unwrap_err();
        assert!(err.contains("not a Lambda HTTP event"), "{err}");
    }
}
