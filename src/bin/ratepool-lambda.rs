//! The API as an AWS Lambda behind API Gateway (REST, proxy integration).
//! Configuration comes from `RATEPOOL_CONFIG_TOML`; clients and state are
//! built once per container and every event is answered by the same router
//! as `ratepool serve`.

use aws_lambda_events::apigw::ApiGatewayProxyRequest;
use lambda_runtime::{LambdaEvent, service_fn};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    ratepool::telemetry::init_logging(true);
    let cfg = ratepool::serve::load_config(None)?;
    let app = ratepool::api::router(ratepool::serve::lambda_state(&cfg, None).await?);
    lambda_runtime::run(service_fn(move |event: LambdaEvent<ApiGatewayProxyRequest>| {
        let app = app.clone();
        async move { Ok::<_, lambda_runtime::Error>(ratepool::lambda::handle(app, event.payload).await) }
    }))
    .await
}
