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
mod signing;
mod startup;
mod stream;
mod telemetry;
mod tls;
mod web;
