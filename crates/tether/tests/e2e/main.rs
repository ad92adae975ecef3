//! End-to-end tests driving real `tether` processes.

mod agent;
mod cluster;
mod common;
mod config;
mod dashboard;
mod device;
mod durability;
mod exec_shim;
mod files;
mod python;
mod realtime;
mod run;
mod schemathesis;
mod seed_agent;
mod shutdown;
mod signing;
mod startup;
mod telemetry;
mod tls;
