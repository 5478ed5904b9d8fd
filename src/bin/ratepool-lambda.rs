//! The API as an AWS Lambda behind API Gateway (REST, proxy integration).
//! Configuration comes from `RATEPOOL_CONFIG_TOML`; clients and state are
//! built once per container and every event is answered by the same router
//! as `ratepool serve`, through `lambda_http`.

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    ratepool::telemetry::init_logging(true);
    let cfg = ratepool::serve::load_config(None)?;
    let app = ratepool::api::router(ratepool::serve::lambda_state(&cfg, None).await?);
    ratepool::lambda::run(app).await
}
