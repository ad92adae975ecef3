//! Test support shared by tether's test suites: a fresh PostgreSQL database
//! per test ([`pg`]), a NATS subject prefix per test ([`nats`]) and a TCP
//! proxy that a test can cut and restore to play a service going away
//! ([`proxy`]). Tests of PostgreSQL and NATS skip, saying why, when their
//! `TETHER_TEST_*` variable is unset; `.ci/run` sets both when the services
//! answer.

pub mod nats;
pub mod pg;
pub mod proxy;

/// Prints why a test does nothing, so a skip is visible in the test output.
pub fn skip(test: &str, why: &str) {
    eprintln!("skipping {test}: {why}");
}
