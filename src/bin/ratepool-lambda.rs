//! The API as an AWS Lambda behind API Gateway (REST, proxy integration),
//! or with `RATEPOOL_LAMBDA=authorizer` its gateway authorizer (the same
//! bundle deployed twice). Configuration comes from `RATEPOOL_CONFIG_TOML`;
//! clients and state are built once per container and every event is
//! answered by the same router as `ratepool serve`, through `lambda_http`.

use ratepool::api::TENANT_KEYS_MAX_AGE;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    ratepool::telemetry::init_logging(true);
    let cfg = ratepool::serve::load_config(None)?;
    match std::env::var("RATEPOOL_LAMBDA").as_deref() {
        Ok("authorizer") => {
            let prefix = std::env::var("RATEPOOL_USAGE_KEY_PREFIX")
                .map_err(|_| "RATEPOOL_USAGE_KEY_PREFIX is not set (the usage plans' key prefix)")?;
            let clients = ratepool::aws::AwsClients::load(&cfg.aws).await;
            let keys = ratepool::serve::tenant_keyring(&cfg, Some(&clients), TENANT_KEYS_MAX_AGE).await?;
            ratepool::lambda::run_authorizer(keys, prefix).await
        }
        Ok("api") | Err(std::env::VarError::NotPresent) => {
            let app = ratepool::api::router(ratepool::serve::lambda_state(&cfg, None).await?);
            ratepool::lambda::run(app).await
        }
        Ok(other) => Err(format!("RATEPOOL_LAMBDA={other:?}: expected \"api\" or \"authorizer\"").into()),
        Err(e) => Err(format!("RATEPOOL_LAMBDA: {e}").into()),
    }
}
