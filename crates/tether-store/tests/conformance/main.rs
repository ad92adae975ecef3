//! The store conformance suite: every test runs against each backend
//! (`sqlite::…` and `postgres::…`) through `&dyn Store` only, so both
//! backends are held to one contract.

mod fixtures;
mod harness;

mod agents;
mod audit;
mod certs;
mod commands;
mod concurrency;
mod configs;
mod device;
mod files;
mod server;
mod signals;
mod telemetry;
mod tokens;
mod users;
