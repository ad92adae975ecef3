//! NATS for tests: the server from the environment and a cluster name
//! (subject prefix) of the test's own.

/// The variable naming the NATS server tests may use.
pub const ENV: &str = "TETHER_TEST_NATS_URL";

/// The NATS URL from [`ENV`], or `None` after printing why `test` skips.
pub fn server(test: &str) -> Option<String> {
    match std::env::var(ENV) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            crate::skip(test, &format!("{ENV} is not set (.ci/run sets it when NATS answers on 127.0.0.1:4222)"));
            None
        }
    }
}

/// A cluster name no other test uses: tether's subjects are
/// `tether.<cluster>.…`, so tests sharing one NATS never hear each other.
pub fn unique_cluster() -> String {
    format!("t{}", uuid::Uuid::now_v7().simple())
}
