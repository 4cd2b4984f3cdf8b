//! Counters and histograms for `GET /metrics`, rendered in the Prometheus text format.
//!
//! Labels carry tenant, key id, model, route and status: never request content.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; LATENCY_BUCKETS.len()],
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *b {
                self.counts[i] += 1;
            }
        }
        self.sum += secs;
        self.count += 1;
    }
}

/// Maps keyed by name, nested so that counting a request looks each name up borrowed:
/// a key is copied only the first time it is seen.
type ByName<V> = BTreeMap<String, V>;

#[derive(Debug, Default)]
struct Inner {
    /// route → status → tenant → key → count
    requests: ByName<BTreeMap<u16, ByName<ByName<u64>>>>,
    /// route → latency
    latency: ByName<Histogram>,
    /// model → time to first token
    ttft: ByName<Histogram>,
    /// tenant → key → model → (completion, prompt) tokens
    tokens: ByName<ByName<ByName<[u64; 2]>>>,
}

/// `m[k]`, inserted (with a copy of `k`) when absent.
fn at<'m, V: Default>(m: &'m mut ByName<V>, k: &str) -> &'m mut V {
    if !m.contains_key(k) {
        m.insert(k.to_string(), V::default());
    }
    m.get_mut(k).expect("present: inserted above")
}

impl Inner {
    /// (route, status, tenant, key, count), in that order.
    fn requests(&self) -> impl Iterator<Item = (&str, u16, &str, &str, u64)> {
        self.requests.iter().flat_map(|(route, by_status)| {
            by_status.iter().flat_map(move |(status, by_tenant)| {
                by_tenant.iter().flat_map(move |(tenant, by_key)| {
                    by_key.iter().map(move |(key, n)| {
                        (route.as_str(), *status, tenant.as_str(), key.as_str(), *n)
                    })
                })
            })
        })
    }

    /// (tenant, key, model, kind, tokens), in that order (kind "completion" before "prompt").
    fn tokens(&self) -> impl Iterator<Item = (&str, &str, &str, &'static str, u64)> {
        self.tokens.iter().flat_map(|(tenant, by_key)| {
            by_key.iter().flat_map(move |(key, by_model)| {
                by_model.iter().flat_map(move |(model, [c, p])| {
                    [("completion", *c), ("prompt", *p)].map(move |(kind, n)| {
                        (tenant.as_str(), key.as_str(), model.as_str(), kind, n)
                    })
                })
            })
        })
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Gauges read at render time.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub in_flight: u64,
    /// (model, requests at the gateway waiting or running)
    pub queue_depth: Vec<(String, u64)>,
    /// ((model, instance), state name, 1 if in that state)
    pub worker_states: Vec<((String, usize), &'static str, u8)>,
    pub worker_restarts: Vec<((String, usize), u64)>,
    /// ((model, instance), failures in a row)
    pub worker_failures: Vec<((String, usize), u64)>,
    pub keys: u64,
    pub draining: bool,
    /// ((model, instance), device, estimated bytes)
    pub placements: Vec<((String, usize), String, u64)>,
    pub inventory: Option<appliance_supervisor::inventory::Inventory>,
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn histogram(out: &mut String, name: &str, label: &str, h: &BTreeMap<String, Histogram>) {
    for (l, h) in h {
        for (b, c) in LATENCY_BUCKETS.iter().zip(h.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{{label}=\"{}\",le=\"{b}\"}} {c}",
                esc(l)
            );
        }
        let _ = writeln!(
            out,
            "{name}_bucket{{{label}=\"{}\",le=\"+Inf\"}} {}",
            esc(l),
            h.count
        );
        let _ = writeln!(out, "{name}_sum{{{label}=\"{}\"}} {}", esc(l), h.sum);
        let _ = writeln!(out, "{name}_count{{{label}=\"{}\"}} {}", esc(l), h.count);
    }
}

/// Running totals for the console's live dashboard (it takes differences between two
/// readings for rates and the recent latency percentile).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub requests: u64,
    /// Answers with status 500 and above.
    pub server_errors: u64,
    /// Answers with status 400–499.
    pub client_errors: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Generation latency (chat and text completions): bucket upper bounds (s) and
    /// cumulative counts, and the total count.
    pub latency_buckets: Vec<f64>,
    pub latency_counts: Vec<u64>,
    pub latency_count: u64,
    /// Requests by tenant.
    pub tenants: BTreeMap<String, u64>,
    /// Requests and tokens by key id.
    pub keys: BTreeMap<String, (u64, u64)>,
}

impl Metrics {
    pub fn summary(&self) -> Summary {
        let m = self.lock();
        let mut s = Summary {
            latency_buckets: LATENCY_BUCKETS.to_vec(),
            latency_counts: vec![0; LATENCY_BUCKETS.len()],
            ..Default::default()
        };
        for (_, status, tenant, key, n) in m.requests() {
            s.requests += n;
            match status {
                500.. => s.server_errors += n,
                400..=499 => s.client_errors += n,
                _ => {}
            }
            if tenant != "-" {
                *s.tenants.entry(tenant.to_string()).or_default() += n;
            }
            if key != "-" {
                s.keys.entry(key.to_string()).or_default().0 += n;
            }
        }
        for route in ["/v1/chat/completions", "/v1/completions"] {
            if let Some(h) = m.latency.get(route) {
                for (c, x) in s.latency_counts.iter_mut().zip(h.counts) {
                    *c += x;
                }
                s.latency_count += h.count;
            }
        }
        for (_, key, _, kind, n) in m.tokens() {
            s.keys.entry(key.to_string()).or_default().1 += n;
            match kind {
                "prompt" => s.prompt_tokens += n,
                _ => s.completion_tokens += n,
            }
        }
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn request(&self, route: &str, status: u16, tenant: &str, key: &str, elapsed: Duration) {
        let mut m = self.lock();
        let by_status = at(&mut m.requests, route);
        *at(at(by_status.entry(status).or_default(), tenant), key) += 1;
        at(&mut m.latency, route).observe(elapsed.as_secs_f64());
    }

    pub fn first_token(&self, model: &str, elapsed: Duration) {
        at(&mut self.lock().ttft, model).observe(elapsed.as_secs_f64());
    }

    pub fn tokens(&self, tenant: &str, key: &str, model: &str, prompt: usize, completion: usize) {
        let mut m = self.lock();
        let [c, p] = at(at(at(&mut m.tokens, tenant), key), model);
        *c += completion as u64;
        *p += prompt as u64;
    }

    pub fn render(&self, s: &Snapshot) -> String {
        let m = self.lock();
        let mut out = String::with_capacity(4096);
        out.push_str("# HELP appliance_http_requests_total API requests answered, by route, status, tenant and key id.\n");
        out.push_str("# TYPE appliance_http_requests_total counter\n");
        for (route, status, tenant, key, n) in m.requests() {
            let _ = writeln!(
                out,
                "appliance_http_requests_total{{route=\"{}\",status=\"{status}\",tenant=\"{}\",key=\"{}\"}} {n}",
                esc(route),
                esc(tenant),
                esc(key)
            );
        }
        out.push_str("# HELP appliance_request_duration_seconds Time from request to the end of the response, by route.\n");
        out.push_str("# TYPE appliance_request_duration_seconds histogram\n");
        histogram(
            &mut out,
            "appliance_request_duration_seconds",
            "route",
            &m.latency,
        );
        out.push_str("# HELP appliance_time_to_first_token_seconds Time from request to the first generated token, by model.\n");
        out.push_str("# TYPE appliance_time_to_first_token_seconds histogram\n");
        histogram(
            &mut out,
            "appliance_time_to_first_token_seconds",
            "model",
            &m.ttft,
        );
        out.push_str("# HELP appliance_tokens_total Tokens processed, by tenant, key, model and kind (prompt or completion).\n");
        out.push_str("# TYPE appliance_tokens_total counter\n");
        for (tenant, key, model, kind, n) in m.tokens() {
            let _ = writeln!(
                out,
                "appliance_tokens_total{{tenant=\"{}\",key=\"{}\",model=\"{}\",kind=\"{kind}\"}} {n}",
                esc(tenant),
                esc(key),
                esc(model)
            );
        }
        drop(m);
        out.push_str("# HELP appliance_in_flight_requests Generation requests being served now.\n");
        out.push_str("# TYPE appliance_in_flight_requests gauge\n");
        let _ = writeln!(out, "appliance_in_flight_requests {}", s.in_flight);
        out.push_str(
            "# HELP appliance_queue_depth Requests admitted for a model and not yet finished.\n",
        );
        out.push_str("# TYPE appliance_queue_depth gauge\n");
        for (model, n) in &s.queue_depth {
            let _ = writeln!(out, "appliance_queue_depth{{model=\"{}\"}} {n}", esc(model));
        }
        out.push_str("# HELP appliance_worker_state 1 for the state each model's worker is in.\n");
        out.push_str("# TYPE appliance_worker_state gauge\n");
        for ((model, i), state, v) in &s.worker_states {
            let _ = writeln!(
                out,
                "appliance_worker_state{{model=\"{}\",instance=\"{i}\",state=\"{state}\"}} {v}",
                esc(model)
            );
        }
        out.push_str("# HELP appliance_worker_restarts_total Worker restarts after a crash or failed start.\n");
        out.push_str("# TYPE appliance_worker_restarts_total counter\n");
        for ((model, i), n) in &s.worker_restarts {
            let _ = writeln!(
                out,
                "appliance_worker_restarts_total{{model=\"{}\",instance=\"{i}\"}} {n}",
                esc(model)
            );
        }
        out.push_str("# HELP appliance_worker_consecutive_failures Failures in a row; the worker state is failed (a crash loop) past a threshold.\n");
        out.push_str("# TYPE appliance_worker_consecutive_failures gauge\n");
        for ((model, i), n) in &s.worker_failures {
            let _ = writeln!(
                out,
                "appliance_worker_consecutive_failures{{model=\"{}\",instance=\"{i}\"}} {n}",
                esc(model)
            );
        }
        out.push_str("# HELP appliance_model_memory_estimate_bytes Memory placement reserved for each model, by device.\n");
        out.push_str("# TYPE appliance_model_memory_estimate_bytes gauge\n");
        for ((model, i), device, bytes) in &s.placements {
            let _ = writeln!(
                out,
                "appliance_model_memory_estimate_bytes{{model=\"{}\",instance=\"{i}\",device=\"{device}\"}} {bytes}",
                esc(model)
            );
        }
        if let Some(inv) = &s.inventory {
            let gauges: [(&str, &str, f64); 8] = [
                (
                    "appliance_cpu_cores",
                    "Physical CPU cores.",
                    inv.cpu_cores as f64,
                ),
                (
                    "appliance_cpu_threads",
                    "Logical CPUs.",
                    inv.cpu_threads as f64,
                ),
                (
                    "appliance_memory_total_bytes",
                    "Installed memory.",
                    inv.memory_total as f64,
                ),
                (
                    "appliance_memory_available_bytes",
                    "Memory available to new work.",
                    inv.memory_available as f64,
                ),
                (
                    "appliance_load1",
                    "Load average over 1 minute.",
                    inv.load_average[0],
                ),
                (
                    "appliance_load5",
                    "Load average over 5 minutes.",
                    inv.load_average[1],
                ),
                (
                    "appliance_disk_total_bytes",
                    "Size of the data directory's filesystem.",
                    inv.disk_total as f64,
                ),
                (
                    "appliance_disk_available_bytes",
                    "Free space on the data directory's filesystem.",
                    inv.disk_available as f64,
                ),
            ];
            for (name, help, v) in gauges {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
            }
            type Reading = fn(&appliance_supervisor::inventory::Gpu) -> f64;
            let per_gpu: [(&str, &str, Reading); 5] = [
                ("appliance_gpu_memory_total_bytes", "GPU memory.", |g| {
                    g.memory_total as f64
                }),
                (
                    "appliance_gpu_memory_used_bytes",
                    "GPU memory in use.",
                    |g| g.memory_used as f64,
                ),
                (
                    "appliance_gpu_utilization_ratio",
                    "GPU busy fraction.",
                    |g| g.utilization_percent as f64 / 100.0,
                ),
                (
                    "appliance_gpu_temperature_celsius",
                    "GPU temperature.",
                    |g| g.temperature_celsius as f64,
                ),
                ("appliance_gpu_power_watts", "GPU power draw.", |g| {
                    g.power_watts
                }),
            ];
            for (name, help, f) in per_gpu {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
                for g in &inv.gpus {
                    let _ = writeln!(
                        out,
                        "{name}{{gpu=\"{}\",name=\"{}\"}} {}",
                        g.index,
                        esc(&g.name),
                        f(g)
                    );
                }
            }
        }
        out.push_str("# HELP appliance_api_keys Keys known to the daemon (any state).\n");
        out.push_str("# TYPE appliance_api_keys gauge\n");
        let _ = writeln!(out, "appliance_api_keys {}", s.keys);
        out.push_str("# HELP appliance_draining 1 while the daemon is shutting down.\n");
        out.push_str("# TYPE appliance_draining gauge\n");
        let _ = writeln!(out, "appliance_draining {}", u8::from(s.draining));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_cumulative_buckets() {
        let m = Metrics::default();
        m.request("/v1/models", 200, "acme", "k1", Duration::from_millis(3));
        m.request("/v1/models", 200, "acme", "k1", Duration::from_millis(300));
        m.tokens("acme", "k1", "m", 5, 7);
        let text = m.render(&Snapshot::default());
        assert!(text.contains(
            "appliance_http_requests_total{route=\"/v1/models\",status=\"200\",tenant=\"acme\",key=\"k1\"} 2"
        ));
        assert!(text.contains(
            "appliance_request_duration_seconds_bucket{route=\"/v1/models\",le=\"0.005\"} 1"
        ));
        assert!(text.contains(
            "appliance_request_duration_seconds_bucket{route=\"/v1/models\",le=\"0.5\"} 2"
        ));
        assert!(text.contains(
            "appliance_request_duration_seconds_bucket{route=\"/v1/models\",le=\"+Inf\"} 2"
        ));
        assert!(text.contains("kind=\"completion\"} 7"));
    }
}
