//! Prometheus metrics: what a mount (or any command) did, in Prometheus naming conventions
//! under the `stratafs_` prefix, and an HTTP endpoint that serves them.
//!
//! The metrics live in one process-wide set ([`metrics()`]) that the stages update where the
//! event happens — the registry transport (requests by status, retries, errors), the cache
//! (hits by tier, fetches, damaged chunks dropped, evictions), the layer reader (verification
//! failures, index mismatches, read latency by where the bytes came from), the FUSE adapter
//! (operations and errors by operation). Gauges that describe state rather than events (per
//! layer: size, bytes fetched, bytes cached, complete; the cache's usage and cap) are refreshed
//! by a [`Collector`] each time the endpoint is scraped.
//!
//! [`serve`] answers `GET /metrics` in the OpenMetrics text format on its own thread (so a
//! scrape never waits for the tokio runtime or a FUSE thread).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// `memory`, `disk` or `registry`.
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModeLabels {
    /// `lazy` (served by stratafs) or `containerd` (unpacked by containerd).
    pub mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabels {
    /// The layer blob digest.
    pub layer: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric stratafs exports.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests sent to registries, by response status (`error` when none came).
    pub registry_requests: Family<StatusLabels, Counter>,
    /// Requests retried after a connection error, timeout, 5xx or 429.
    pub registry_retries: Counter,
    /// Requests that failed for good, by kind (connect, timeout, status, tls, …).
    pub registry_errors: Family<KindLabels, Counter>,
    /// Bytes of layer blobs read from registries.
    pub layer_fetched_bytes: Family<LayerLabels, Counter>,
    /// Chunks found in the cache, by tier (`memory`, `disk`).
    pub cache_hits: Family<SourceLabels, Counter>,
    /// Chunks that had to be fetched.
    pub cache_misses: Counter,
    /// Damaged chunk files found and dropped.
    pub cache_corrupt_chunks: Counter,
    /// Chunk files evicted to keep the cache under its cap.
    pub cache_evictions: Counter,
    /// Bytes the cache holds on disk, and its cap.
    pub cache_bytes: Gauge,
    pub cache_cap_bytes: Gauge,
    /// Spans that failed verification (digest, decompression) when fetched.
    pub verification_failures: Counter,
    /// Published indexes caught describing something other than their layer.
    pub index_mismatches: Counter,
    /// Time to serve one read of a layer, by where its bytes came from.
    pub read_duration_seconds: HistogramFamily<SourceLabels>,
    /// FUSE operations, and those answered with an error, by operation.
    pub fuse_operations: Family<OpLabels, Counter>,
    pub fuse_errors: Family<OpLabels, Counter>,
    /// Cached bytes handed to the kernel's page cache before a read asked for them.
    pub page_cache_pushed_bytes: Counter,
    /// Per layer in use: uncompressed size, bytes cached, whether all of it is cached.
    pub layer_size_bytes: Family<LayerLabels, Gauge>,
    pub layer_cached_bytes: Family<LayerLabels, Gauge>,
    pub layer_complete: Family<LayerLabels, Gauge>,
    /// Range-request runs being fetched now (each a demand miss, its read-ahead, or a
    /// background step).
    pub fetches_in_flight: Gauge,
    /// Layers containerd asked the snapshotter for, by how they were provided.
    pub snapshotter_layers: Family<ModeLabels, Counter>,
}

fn read_histogram() -> Histogram {
    // 100 µs to about 100 s.
    Histogram::new(exponential_buckets(0.0001, 4.0, 11))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("stratafs");
        let m = Metrics {
            registry_requests: Family::default(),
            registry_retries: Counter::default(),
            registry_errors: Family::default(),
            layer_fetched_bytes: Family::default(),
            cache_hits: Family::default(),
            cache_misses: Counter::default(),
            cache_corrupt_chunks: Counter::default(),
            cache_evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_cap_bytes: Gauge::default(),
            verification_failures: Counter::default(),
            index_mismatches: Counter::default(),
            read_duration_seconds: Family::new_with_constructor(read_histogram),
            fuse_operations: Family::default(),
            fuse_errors: Family::default(),
            page_cache_pushed_bytes: Counter::default(),
            layer_size_bytes: Family::default(),
            layer_cached_bytes: Family::default(),
            layer_complete: Family::default(),
            fetches_in_flight: Gauge::default(),
            snapshotter_layers: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "registry_requests",
            "HTTP requests sent to registries, by response status",
            m.registry_requests.clone(),
        );
        r.register(
            "registry_retries",
            "Registry requests retried (connection error, timeout, 5xx, 429)",
            m.registry_retries.clone(),
        );
        r.register(
            "registry_errors",
            "Registry requests that failed for good, by kind",
            m.registry_errors.clone(),
        );
        r.register(
            "layer_fetched_bytes",
            "Bytes of layer blobs read from registries",
            m.layer_fetched_bytes.clone(),
        );
        r.register(
            "cache_hits",
            "Chunks found in the cache, by tier",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Chunks that had to be fetched",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_corrupt_chunks",
            "Damaged chunk files found and dropped",
            m.cache_corrupt_chunks.clone(),
        );
        r.register(
            "cache_evictions",
            "Chunk files evicted to keep the cache under its cap",
            m.cache_evictions.clone(),
        );
        r.register(
            "cache_size_bytes",
            "Bytes the chunk cache holds on disk",
            m.cache_bytes.clone(),
        );
        r.register(
            "cache_cap_bytes",
            "The chunk cache's cap",
            m.cache_cap_bytes.clone(),
        );
        r.register(
            "verification_failures",
            "Fetched spans that failed verification",
            m.verification_failures.clone(),
        );
        r.register(
            "index_mismatches",
            "Published indexes caught describing something other than their layer",
            m.index_mismatches.clone(),
        );
        r.register(
            "read_duration_seconds",
            "Time to serve one read of a layer, by where its bytes came from",
            m.read_duration_seconds.clone(),
        );
        r.register(
            "fuse_operations",
            "FUSE operations, by operation",
            m.fuse_operations.clone(),
        );
        r.register(
            "fuse_errors",
            "FUSE operations answered with an error, by operation",
            m.fuse_errors.clone(),
        );
        r.register(
            "page_cache_pushed_bytes",
            "Cached bytes handed to the kernel's page cache before a read asked for them (whole files at their first open)",
            m.page_cache_pushed_bytes.clone(),
        );
        r.register(
            "layer_size_bytes",
            "Uncompressed size of a layer in use",
            m.layer_size_bytes.clone(),
        );
        r.register(
            "layer_cached_bytes",
            "Bytes of a layer in use that are cached",
            m.layer_cached_bytes.clone(),
        );
        r.register(
            "layer_complete",
            "1 when every byte of a layer in use is cached",
            m.layer_complete.clone(),
        );
        r.register(
            "fetches_in_flight",
            "Range-request runs being fetched from registries now",
            m.fetches_in_flight.clone(),
        );
        r.register(
            "snapshotter_layers",
            "Layers containerd asked the snapshotter for, by mode (lazy, containerd)",
            m.snapshotter_layers.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The metrics in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Counts one FUSE operation.
    pub fn fuse_op(&self, op: &str) {
        let labels = OpLabels { op: op.to_string() };
        self.fuse_operations.get_or_create(&labels).inc();
    }

    /// Counts one FUSE operation answered with an error.
    pub fn fuse_error(&self, op: &str) {
        let labels = OpLabels { op: op.to_string() };
        self.fuse_errors.get_or_create(&labels).inc();
    }

    /// Counts one registry request by its response status (`error`: none came).
    pub fn registry_request(&self, status: &str) {
        let labels = StatusLabels {
            status: status.to_string(),
        };
        self.registry_requests.get_or_create(&labels).inc();
    }

    /// Counts one registry request that failed for good, by kind.
    pub fn registry_error(&self, kind: &str) {
        let labels = KindLabels {
            kind: kind.to_string(),
        };
        self.registry_errors.get_or_create(&labels).inc();
    }

    /// Counts bytes of `layer` read from a registry.
    pub fn fetched(&self, layer: &str, bytes: u64) {
        let labels = LayerLabels {
            layer: layer.to_string(),
        };
        self.layer_fetched_bytes
            .get_or_create(&labels)
            .inc_by(bytes);
    }

    /// Counts one chunk found in the cache, by tier (`memory`, `disk`).
    pub fn cache_hit(&self, tier: &str) {
        let labels = SourceLabels {
            source: tier.to_string(),
        };
        self.cache_hits.get_or_create(&labels).inc();
    }

    /// Counts bytes handed to the kernel's page cache unasked.
    pub fn pushed(&self, bytes: u64) {
        self.page_cache_pushed_bytes.inc_by(bytes);
    }

    /// Records one read of a layer and where its bytes came from.
    pub fn read(&self, source: &str, seconds: f64) {
        self.read_duration_seconds
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .observe(seconds);
    }

    /// Counts one layer the snapshotter provided, `lazy` or left to `containerd`.
    pub fn snapshotter_layer(&self, mode: &str) {
        let labels = ModeLabels {
            mode: mode.to_string(),
        };
        self.snapshotter_layers.get_or_create(&labels).inc();
    }

    /// Sets the per-layer gauges of one layer.
    pub fn layer(&self, layer: &str, size: u64, cached: u64) {
        let labels = LayerLabels {
            layer: layer.to_string(),
        };
        self.layer_size_bytes
            .get_or_create(&labels)
            .set(size as i64);
        self.layer_cached_bytes
            .get_or_create(&labels)
            .set(cached as i64);
        self.layer_complete
            .get_or_create(&labels)
            .set(i64::from(cached >= size));
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Refreshes state gauges just before a scrape is answered.
pub type Collector = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Serves `GET /metrics` at `addr` on a thread of its own; returns the address bound (a port
/// of 0 picks a free one). Other paths get 404.
pub fn serve(addr: &str, collect: Collector) -> std::io::Result<std::net::SocketAddr> {
    serve_text(
        addr,
        Arc::new(move || {
            collect(metrics());
            metrics().encode()
        }),
    )
}

/// Renders the whole text of one scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// [`serve`] with the answer rendered by `render` (such as this process's metrics merged with
/// those of the daemons it started, see [`merge`]).
pub fn serve_text(addr: &str, render: Render) -> std::io::Result<std::net::SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| std::io::Error::other(format!("metrics endpoint {addr}: {e}")))?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| std::io::Error::other("metrics endpoint: not an IP address"))?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = if request.url() == "/metrics" {
                    let header = tiny_http::Header::from_bytes(
                        "Content-Type",
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )
                    .expect("valid header");
                    tiny_http::Response::from_string(render()).with_header(header)
                } else {
                    tiny_http::Response::from_string("not found: try /metrics\n")
                        .with_status_code(404)
                };
                let _ = request.respond(response);
            }
        })?;
    Ok(bound)
}

/// Fetches `http://ADDR/metrics` (a loopback daemon's endpoint), waiting at most `timeout`.
pub fn scrape(addr: &str, timeout: std::time::Duration) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let socket: std::net::SocketAddr = addr
        .parse()
        .map_err(|e| std::io::Error::other(format!("metrics address {addr}: {e}")))?;
    let mut conn = std::net::TcpStream::connect_timeout(&socket, timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    write!(conn, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    conn.take(64 << 20).read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("{addr}: not an HTTP response")))?;
    if !head.starts_with("HTTP/1.") || head.split(' ').nth(1) != Some("200") {
        let status = head.lines().next().unwrap_or_default();
        return Err(std::io::Error::other(format!("{addr}: {status}")));
    }
    Ok(body.to_string())
}

/// Merges the OpenMetrics texts of several processes into one: samples of the same series
/// (name and labels) are added up, except gauges, of which the largest is kept (they describe
/// shared state: one cache, one layer seen by several mounts) — but `*_in_flight` gauges count
/// per process and are added. Families keep the order and metadata (one line of each kind)
/// in which they first appear. Counters of a process that has exited drop out of the sum,
/// which Prometheus takes for a counter reset.
pub fn merge(texts: &[String]) -> String {
    struct Family {
        meta: Vec<String>,
        gauge: bool,
        samples: Vec<(String, f64)>,
    }
    let mut families: Vec<(String, Family)> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(meta) = line.strip_prefix("# ") {
                let mut words = meta.splitn(3, ' ');
                let (Some(kind), Some(name)) = (words.next(), words.next()) else {
                    continue;
                };
                if kind == "EOF" {
                    continue;
                }
                let at = match families.iter().position(|(n, _)| n == name) {
                    Some(at) => at,
                    None => {
                        let family = Family {
                            meta: Vec::new(),
                            gauge: false,
                            samples: Vec::new(),
                        };
                        families.push((name.to_string(), family));
                        families.len() - 1
                    }
                };
                let family = &mut families[at].1;
                let prefix = format!("# {kind} ");
                if !family.meta.iter().any(|m| m.starts_with(&prefix)) {
                    // The first process's HELP, TYPE and UNIT stand.
                    family.gauge |= kind == "TYPE"
                        && words.next() == Some("gauge")
                        && !name.ends_with("_in_flight");
                    family.meta.push(line.to_string());
                }
                current = Some(at);
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (Some(at), Ok(value)) = (current, value.parse::<f64>()) else {
                continue;
            };
            let family = &mut families[at].1;
            match family.samples.iter_mut().find(|(s, _)| s == series) {
                Some((_, total)) if family.gauge => *total = total.max(value),
                Some((_, total)) => *total += value,
                None => family.samples.push((series.to_string(), value)),
            }
        }
    }
    let mut out = String::new();
    for (_, family) in families {
        for m in family.meta {
            out.push_str(&m);
            out.push('\n');
        }
        for (series, value) in family.samples {
            out.push_str(&format!("{series} {value}\n"));
        }
    }
    out.push_str("# EOF\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_as_prometheus_expects_and_served() {
        let m = metrics();
        m.fuse_op("read");
        m.fuse_error("read");
        m.read("registry", 0.02);
        m.layer("sha256:abc", 100, 100);
        let addr = serve(
            "127.0.0.1:0",
            Arc::new(|m: &Metrics| {
                m.cache_bytes.set(42);
            }),
        )
        .unwrap();
        let body = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        for line in [
            "stratafs_fuse_operations_total{op=\"read\"} ",
            "stratafs_fuse_errors_total{op=\"read\"} ",
            "stratafs_read_duration_seconds_bucket{",
            "stratafs_layer_complete{layer=\"sha256:abc\"} 1",
            "stratafs_cache_size_bytes 42",
            "# EOF",
        ] {
            assert!(body.contains(line), "{line} missing from\n{body}");
        }
        let missing = ureq::get(&format!("http://{addr}/other")).call();
        assert!(matches!(missing, Err(ureq::Error::Status(404, _))));
        // What a snapshotter gathers from its daemons answers the same way.
        let scraped = scrape(&addr.to_string(), std::time::Duration::from_secs(5)).unwrap();
        assert!(
            scraped.contains("stratafs_cache_size_bytes 42"),
            "{scraped}"
        );
        assert!(scrape(&addr.to_string().replace(":", ":x"), Default::default()).is_err());
    }

    #[test]
    fn merged_metrics_add_counters_and_keep_the_largest_gauge() {
        let a = "# HELP stratafs_fuse_operations FUSE operations.\n\
                 # TYPE stratafs_fuse_operations counter\n\
                 stratafs_fuse_operations_total{op=\"read\"} 3\n\
                 # TYPE stratafs_cache_size_bytes gauge\n\
                 stratafs_cache_size_bytes 10\n\
                 # EOF\n";
        let b = "# HELP stratafs_fuse_operations FUSE operations.\n\
                 # TYPE stratafs_fuse_operations counter\n\
                 stratafs_fuse_operations_total{op=\"read\"} 4\n\
                 stratafs_fuse_operations_total{op=\"open\"} 1\n\
                 # TYPE stratafs_cache_size_bytes gauge\n\
                 stratafs_cache_size_bytes 7.5\n\
                 # EOF\n";
        let merged = merge(&[a.to_string(), b.to_string()]);
        assert_eq!(
            merged,
            "# HELP stratafs_fuse_operations FUSE operations.\n\
             # TYPE stratafs_fuse_operations counter\n\
             stratafs_fuse_operations_total{op=\"read\"} 7\n\
             stratafs_fuse_operations_total{op=\"open\"} 1\n\
             # TYPE stratafs_cache_size_bytes gauge\n\
             stratafs_cache_size_bytes 10\n\
             # EOF\n"
        );
    }
}
