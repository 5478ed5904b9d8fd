//! A database of its own on the PostgreSQL server `make test` starts
//! (`RATEPOOL_TEST_POSTGRES_URL`, see infra/postgres.sh), for each test.

/// The server's address; these tests cannot run without one.
pub fn server_url() -> String {
    std::env::var("RATEPOOL_TEST_POSTGRES_URL").unwrap_or_else(|_| {
        panic!(
            "RATEPOOL_TEST_POSTGRES_URL is not set: run the PostgreSQL tests through `make test`, which starts a server"
        )
    })
}

/// Creates an empty database and returns its URL.
pub async fn fresh_database() -> String {
    ratepool::postgres::create_database(&server_url()).await.expect("create a database on the test server")
}
