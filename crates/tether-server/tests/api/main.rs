//! Black-box tests: the real server on port 0, driven over HTTP.

mod abuse;
mod audit;
mod auth;
mod commands;
mod common;
mod configs;
mod connections;
mod database;
mod device;
mod items;
mod limits;
mod passwords;
mod prometheus;
mod rbac;
mod realtime;
mod seed_000;
mod seed_001;
mod seed_002;
mod seed_003;
mod seed_004;
mod signing;
mod startup;
mod stream;
mod telemetry;
mod tls;
mod web;
