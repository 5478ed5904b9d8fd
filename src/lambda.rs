//! The API behind API Gateway. `lambda_http` turns a REST proxy event
//! (multi-value headers and query strings, base64 bodies included) into an
//! HTTP request for the same axum router `ratepool serve` uses, and its
//! answer back into the proxy response. No route, check or body is
//! implemented twice.
//!
//! The same binary is also the API's gateway authorizer
//! ([`run_authorizer`]), so a request without a tenant's key is refused by
//! API Gateway before the API Lambda runs.

use std::sync::Arc;

use lambda_http::aws_lambda_events::apigw::ApiGatewayCustomAuthorizerRequestTypeRequest;
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

/// A REST proxy event as API Gateway sends it for `method path?query`
/// with `body` and `headers` (on a real captured event,
/// `tests/fixtures/apigw_proxy_event.json`): the query string apart from
/// the path, each header in both `headers` and `multiValueHeaders`. For
/// [`invoke`] in tests and the benchmark.
pub fn rest_event(
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    use serde_json::{Value, json};
    let mut event: Value = serde_json::from_str(include_str!("../tests/fixtures/apigw_proxy_event.json"))
        .map_err(|e| format!("the captured event: {e}"))?;
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes()).into_owned().collect();
    if !pairs.is_empty() {
        event["queryStringParameters"] = pairs.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        event["multiValueQueryStringParameters"] = pairs.iter().map(|(k, v)| (k.clone(), json!([v]))).collect();
    }
    event["httpMethod"] = json!(method);
    event["path"] = json!(path);
    event["pathParameters"]["proxy"] = json!(path.trim_start_matches('/'));
    event["requestContext"]["httpMethod"] = json!(method);
    event["body"] = body.map_or(Value::Null, |b| json!(b));
    for (name, value) in headers {
        event["headers"][*name] = json!(value);
        event["multiValueHeaders"][*name] = json!([value]);
    }
    Ok(event)
}

/// API Gateway answers 401 when an authorizer fails with exactly this message.
const UNAUTHORIZED: &str = "Unauthorized";

/// Serves API Gateway's REQUEST authorizer (identity source: the
/// `Authorization` header) on the Lambda Runtime API: the tenant of a
/// `Bearer` key, or 401. `usage_key_prefix` + the tenant's name is the
/// usage identifier key, which selects the tenant's usage plan (its
/// throttle) in API Gateway.
pub async fn run_authorizer(
    keys: Arc<crate::api::TenantKeyring>,
    usage_key_prefix: String,
) -> Result<(), lambda_runtime::Error> {
    let handler = lambda_runtime::service_fn(
        move |event: lambda_runtime::LambdaEvent<ApiGatewayCustomAuthorizerRequestTypeRequest>| {
            let (keys, prefix) = (keys.clone(), usage_key_prefix.clone());
            async move {
                authorize(&keys, &prefix, &event.payload).await.map_err(|()| lambda_runtime::Error::from(UNAUTHORIZED))
            }
        },
    );
    lambda_runtime::run(handler).await
}

/// The authorizer's answer: an Allow policy for every method and path of
/// the request's API stage (API Gateway caches the answer per key for all
/// routes), the tenant as principal and context, and its usage key; `Err`
/// for a missing or unknown key, or an event without a method ARN.
pub async fn authorize(
    keys: &crate::api::TenantKeyring,
    usage_key_prefix: &str,
    req: &ApiGatewayCustomAuthorizerRequestTypeRequest,
) -> Result<serde_json::Value, ()> {
    let tenant = keys.authenticate(&req.headers).await.map_err(|_| ())?;
    // arn:aws:execute-api:REGION:ACCOUNT:API_ID/STAGE/METHOD/PATH…
    let method_arn = req.method_arn.as_deref().ok_or(())?;
    let (account_part, api_part) = method_arn.rsplit_once(':').ok_or(())?;
    let mut api = api_part.splitn(3, '/');
    let (Some(api_id), Some(stage)) = (api.next(), api.next()) else { return Err(()) };
    if api_id.is_empty() || stage.is_empty() {
        return Err(());
    }
    Ok(serde_json::json!({
        "principalId": tenant.as_str(),
        "policyDocument": {
            "Version": "2012-10-17",
            "Statement": [{
                "Action": "execute-api:Invoke",
                "Effect": "Allow",
                "Resource": format!("{account_part}:{api_id}/{stage}/*/*"),
            }],
        },
        "context": {"tenant": tenant.as_str()},
        "usageIdentifierKey": format!("{usage_key_prefix}{}", tenant.as_str()),
    }))
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

    fn authorizer_event(authorization: Option<&str>) -> ApiGatewayCustomAuthorizerRequestTypeRequest {
        let mut headers = json!({"Host": "abc123.execute-api.us-east-1.amazonaws.com"});
        if let Some(a) = authorization {
            headers["Authorization"] = json!(a);
        }
        serde_json::from_value(json!({
            "type": "REQUEST",
            "methodArn": "arn:aws:execute-api:us-east-1:111122223333:abc123/prod/POST/v1/jobs",
            "resource": "/v1/jobs",
            "path": "/v1/jobs",
            "httpMethod": "POST",
            "headers": headers,
            "multiValueHeaders": {},
            "queryStringParameters": {},
            "pathParameters": {},
            "stageVariables": {},
            "requestContext": {"path": "/prod/v1/jobs", "accountId": "111122223333", "resourceId": "r1",
                "stage": "prod", "requestId": "req-1", "resourcePath": "/v1/jobs", "httpMethod": "POST",
                "apiId": "abc123", "identity": {"sourceIp": "192.0.2.1"}},
        }))
        .unwrap()
    }

    /// A tenant's key gets an Allow for the whole stage (one cached answer
    /// serves every route), its name as principal and context, and its
    /// usage plan's key; anything else is refused, which API Gateway turns
    /// into a 401 before the API Lambda runs.
    #[tokio::test]
    async fn the_authorizer_allows_a_tenants_key_with_its_usage_key_and_refuses_anything_else() {
        let keys = crate::api::TenantKeyring::fixed(vec![crate::config::TenantKey {
            tenant: crate::domain::TenantId::parse("screenplays").unwrap(),
            key: "screenplays-key-0123456789".to_string().into(),
        }]);
        let prefix = "Ratepool-usage-key-";
        let ok = authorize(&keys, prefix, &authorizer_event(Some("Bearer screenplays-key-0123456789"))).await.unwrap();
        assert_eq!(ok["principalId"], "screenplays");
        assert_eq!(ok["context"]["tenant"], "screenplays");
        assert_eq!(ok["usageIdentifierKey"], "Ratepool-usage-key-screenplays");
        let statement = &ok["policyDocument"]["Statement"][0];
        assert_eq!(statement["Effect"], "Allow");
        assert_eq!(statement["Action"], "execute-api:Invoke");
        assert_eq!(statement["Resource"], "arn:aws:execute-api:us-east-1:111122223333:abc123/prod/*/*");

        for refused in [None, Some("Bearer wrong-key-0123456789abc"), Some("screenplays-key-0123456789"), Some("")] {
            assert_eq!(authorize(&keys, prefix, &authorizer_event(refused)).await, Err(()), "{refused:?}");
        }
        let mut no_arn = authorizer_event(Some("Bearer screenplays-key-0123456789"));
        no_arn.method_arn = Some("not-an-arn".into());
        assert_eq!(authorize(&keys, prefix, &no_arn).await, Err(()));
    }
}
