//! The API behind API Gateway: a REST proxy event is turned into an HTTP
//! request for the same axum router `ratepool serve` uses, and its answer
//! back into a proxy response. No route, check or body is implemented twice.

use aws_lambda_events::apigw::{ApiGatewayProxyRequest, ApiGatewayProxyResponse};
use aws_lambda_events::encodings::Body as EventBody;
use axum::body::Body;
use base64::Engine as _;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// Answers one API Gateway proxy event with `app`.
pub async fn handle(app: axum::Router, event: ApiGatewayProxyRequest) -> ApiGatewayProxyResponse {
    match to_request(event) {
        Ok(req) => match app.oneshot(req).await {
            Ok(resp) => to_response(resp).await,
            Err(never) => match never {},
        },
        Err(message) => error_response(400, &message),
    }
}

fn to_request(event: ApiGatewayProxyRequest) -> Result<http::Request<Body>, String> {
    let path = event.path.unwrap_or_else(|| "/".into());
    let mut uri = path;
    let query: Vec<(String, String)> =
        event.query_string_parameters.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    if !query.is_empty() {
        let q: Vec<String> = query.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
        uri.push('?');
        uri.push_str(&q.join("&"));
    }
    let body = match (event.body, event.is_base64_encoded) {
        (None, _) => Vec::new(),
        (Some(b), false) => b.into_bytes(),
        (Some(b), true) => {
            base64::engine::general_purpose::STANDARD.decode(b).map_err(|e| format!("body: not valid base64: {e}"))?
        }
    };
    let mut builder = http::Request::builder().method(event.http_method).uri(&uri);
    for (name, value) in event.headers.iter() {
        builder = builder.header(name, value);
    }
    builder.body(Body::from(body)).map_err(|e| format!("request: {e}"))
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn to_response(resp: http::Response<Body>) -> ApiGatewayProxyResponse {
    let (parts, body) = resp.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(500, &format!("response body: {e}")),
    };
    let mut out = ApiGatewayProxyResponse::default();
    out.status_code = i64::from(parts.status.as_u16());
    out.headers = parts.headers;
    match String::from_utf8(bytes.to_vec()) {
        Ok(text) => out.body = Some(EventBody::Text(text)),
        Err(e) => {
            out.body = Some(EventBody::Text(base64::engine::general_purpose::STANDARD.encode(e.into_bytes())));
            out.is_base64_encoded = true;
        }
    }
    out
}

fn error_response(status: u16, message: &str) -> ApiGatewayProxyResponse {
    let mut out = ApiGatewayProxyResponse::default();
    out.status_code = i64::from(status);
    out.headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
    let body = serde_json::json!({"error": {"type": "invalid_request", "message": message}});
    out.body = Some(EventBody::Text(body.to_string()));
    out
}
