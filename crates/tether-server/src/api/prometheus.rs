//! `GET /metrics`: this server's counters, gauges and latency histograms in
//! the Prometheus text format, and the layer that times every request.
//!
//! The `metrics` recorder is process-global: it is installed once
//! ([`handle`]) however many servers a process starts (the API tests start
//! many), so series from every server of one process add up. Gauges read from
//! [`AppState`] are set at scrape time from the server that was asked.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, State};
use axum::http::{HeaderValue, Method, header};
use axum::response::{IntoResponse, Response};
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

/// How long one read of the fleet counts is shown: however often `/metrics`
/// is scraped, the database sees at most one count per this period.
const FLEET_COUNTS_TTL: Duration = Duration::from_secs(15);

/// The last fleet counts and when they were read.
#[derive(Debug, Default)]
pub struct FleetGauges(tokio::sync::Mutex<Option<Instant>>);

impl FleetGauges {
    /// Sets `tether_agents{status}` and `tether_commands{status}` from the
    /// store, unless they were read within the last [`FLEET_COUNTS_TTL`].
    async fn refresh(&self, state: &AppState) {
        // Held while reading: concurrent scrapes wait for one read.
        let mut last = self.0.lock().await;
        if last.is_some_and(|at| at.elapsed() < FLEET_COUNTS_TTL) {
            return;
        }
        *last = Some(Instant::now());
        match state.store.fleet_counts(state.config.telemetry.seen_since(state.clock.now_ms())).await {
            Ok(c) => {
                gauge!("tether_agents", "status" => "online").set(c.agents_online as f64);
                gauge!("tether_agents", "status" => "offline").set(c.agents_offline as f64);
                gauge!("tether_agents", "status" => "revoked").set(c.agents_revoked as f64);
                // A state no command is in any more reads 0, not its last count.
                for status in tether_proto::command::CommandStatus::ALL {
                    let n = c.commands.iter().find(|(s, _)| s == status.as_str()).map_or(0, |(_, n)| *n);
                    gauge!("tether_commands", "status" => status.as_str()).set(n as f64);
                }
            }
            Err(e) => tracing::warn!(error = %e, "Counting agents and commands for /metrics failed"),
        }
    }
}

/// The media type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Histogram buckets for request, store call and notifier latencies, in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// How often histogram samples are folded into their buckets when nobody scrapes.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Series names, shared with the code that records them.
pub const HTTP_REQUESTS: &str = "tether_http_requests_total";
pub const HTTP_DURATION: &str = "tether_http_request_duration_seconds";
pub const NOTIFIER_LAG: &str = "tether_notifier_lag_seconds";

/// The process's recorder, installed on first use.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(LATENCY_BUCKETS)
            .expect("the latency bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if let Err(e) = metrics::set_global_recorder(recorder) {
            // Only if something else in the process installed one first.
            tracing::warn!(error = %e, "Another metrics recorder is installed: /metrics shows only what it records");
        }
        describe();
        gauge!("tether_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        // Histogram samples wait in per-series buffers until upkeep folds
        // them into buckets; without scrapes they would pile up. The thread
        // lives as long as the process-wide recorder it serves.
        let upkeep = handle.clone();
        let spawned = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "Could not start the metrics upkeep thread: histograms are folded at scrapes only");
        }
        handle
    })
}

fn describe() {
    describe_gauge!("tether_build_info", "Always 1; the label carries this server's version.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered, by route template, method and status.");
    describe_histogram!(
        HTTP_DURATION,
        Unit::Seconds,
        "Time from a request reaching the router to its response headers (long-polls included)."
    );
    describe_histogram!(
        "tether_store_call_duration_seconds",
        Unit::Seconds,
        "Store (database) call latency, by store method."
    );
    describe_histogram!(
        NOTIFIER_LAG,
        Unit::Seconds,
        "Delay from a stream event being published by one replica to its receipt here over NATS (wall clocks)."
    );
    describe_gauge!("tether_parked_polls", "Agent long-polls waiting for a signal right now.");
    describe_gauge!("tether_agents", "Agents by status (online, offline, revoked), read at most every 15 s.");
    describe_gauge!("tether_commands", "Commands by state, read at most every 15 s.");
    describe_counter!("tether_heartbeats_received_total", "Heartbeats answered 200 (each committed).");
    describe_counter!("tether_heartbeats_written_total", "Heartbeats written by the group writer.");
    describe_histogram!("tether_heartbeat_group_size", "Heartbeats written in one transaction.");
    describe_histogram!("tether_result_group_size", "Command result reports recorded in one transaction.");
    describe_histogram!("tether_delivery_group_size", "Agents' deliveries marked in one transaction.");
    describe_counter!("tether_metric_points_stored_total", "Metric points stored.");
    describe_counter!("tether_presence_transitions_total", "Agents going online or offline.");
    describe_counter!("tether_webhook_deliveries_total", "Presence webhook deliveries, by outcome.");
    describe_counter!("tether_webhook_dropped_total", "Presence alerts dropped because the webhook queue was full.");
    describe_gauge!("tether_loaded_streams", "Agent streams held in memory.");
    describe_gauge!("tether_open_connections", "Client connections open right now.");
    describe_gauge!(
        "tether_peers_connected",
        "1 while this server reaches its peers over NATS (always 1 without NATS)."
    );
    describe_gauge!("tether_login_limiter_keys", "Keys held by the login rate limiter.");
    describe_counter!("tether_events_from_peers_total", "Stream events received from other servers over NATS.");
    describe_counter!(
        "tether_events_not_published_total",
        "Stream events dropped because the NATS publish queue was full."
    );
    describe_counter!("tether_store_calls_total", "Store calls made by this server.");
    describe_counter!("tether_password_verifications_total", "argon2 password verifications run.");
    describe_counter!("tether_password_cache_hits_total", "Basic credentials answered from the 60 s cache.");
    describe_counter!(
        "tether_password_checks_refused_busy_total",
        "Password checks refused (503) because every verification slot was busy."
    );
}

/// `GET /metrics`: the Prometheus text format (0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "meta",
    responses((status = 200, description = "Prometheus text exposition format 0.0.4", content_type = "text/plain", body = String))
)]
pub async fn get(State(state): State<AppState>) -> Response {
    let handle = handle();
    let p = &state.passwords;
    let peers = state.notifier.counters();
    gauge!("tether_parked_polls").set(state.streams.parked() as f64);
    gauge!("tether_loaded_streams").set(state.streams.loaded() as f64);
    gauge!("tether_open_connections").set(state.open_connections.load(std::sync::atomic::Ordering::Relaxed) as f64);
    gauge!("tether_peers_connected").set(if state.notifier.connected() { 1.0 } else { 0.0 });
    gauge!("tether_login_limiter_keys").set(state.limits.login_keys_held() as f64);
    counter!("tether_events_from_peers_total").absolute(peers.received);
    counter!("tether_events_not_published_total").absolute(peers.dropped);
    counter!("tether_store_calls_total").absolute(state.store_calls.get());
    counter!("tether_password_verifications_total").absolute(p.verifications());
    counter!("tether_password_cache_hits_total").absolute(p.cache_hits());
    counter!("tether_password_checks_refused_busy_total").absolute(p.refused_busy());
    state.fleet_gauges.refresh(&state).await;
    handle.run_upkeep();
    let mut res = handle.render().into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    res
}

/// Counts and times every request by its route template (`MatchedPath`,
/// never the raw path, so the series stay bounded); requests no route
/// matched are `route="unmatched"`. Put on the router with `Router::layer`,
/// which runs it after routing. A plain `Service` like the other layers: a
/// parked long-poll holds only the template, the method and a start time.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpMetricsLayer;

impl<S> tower::Layer<S> for HttpMetricsLayer {
    type Service = HttpMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        HttpMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct HttpMetrics<S> {
    inner: S,
}

impl<S, B> tower::Service<axum::http::Request<B>> for HttpMetrics<S>
where
    S: tower::Service<axum::http::Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = HttpMetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Self::Future {
        let route = req.extensions().get::<MatchedPath>().cloned();
        let method = req.method().clone();
        HttpMetricsFuture { inner: self.inner.call(req), route, method, start: Instant::now() }
    }
}

/// The method as a label: the standard ones by name, any other `other`,
/// since a client may send any token as a method and each would otherwise
/// be a new series kept forever.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

pin_project_lite::pin_project! {
    /// Records the request once its response is ready.
    pub struct HttpMetricsFuture<F> {
        #[pin]
        inner: F,
        route: Option<MatchedPath>,
        method: Method,
        start: Instant,
    }
}

impl<F, E> std::future::Future for HttpMetricsFuture<F>
where
    F: std::future::Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.inner.poll(cx));
        if let Ok(res) = &res {
            let route = this.route.as_ref().map_or("unmatched", |r| r.as_str()).to_owned();
            let method = method_label(this.method);
            let status = res.status().as_u16().to_string();
            counter!(HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status).increment(1);
            histogram!(HTTP_DURATION, "route" => route, "method" => method).record(this.start.elapsed().as_secs_f64());
        }
        std::task::Poll::Ready(res)
    }
}
