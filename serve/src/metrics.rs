//! The server's Prometheus metrics (`GET /metrics`, text format 0.0.4).
//!
//! Throughput is exported both as counters of tokens and seconds (what a Prometheus `rate()`
//! wants) and as gauges of the latest prefill pass and decode step (what a glance wants).
use anyhow::Result;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Finished HTTP requests by endpoint and status code.
    pub requests: IntCounterVec,
    /// Sequences (one per prompt) waiting for a batch slot.
    pub queue_depth: IntGauge,
    /// Sequences in the running batch.
    pub running: IntGauge,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub prefill_seconds: prometheus::Counter,
    pub decode_seconds: prometheus::Counter,
    pub prefill_tokens_per_second: Gauge,
    pub decode_tokens_per_second: Gauge,
    /// Sequences dropped because their client went away.
    pub cancelled: IntCounter,
    /// Request latency (arrival to last byte) by endpoint.
    pub request_latency: HistogramVec,
    pub time_to_first_token: Histogram,
    pub decode_step_seconds: Histogram,
    pub batch_size: Histogram,
    /// `--speculative`: draft tokens the decoder proposed, and those the full model kept.
    pub speculative_proposed: IntCounter,
    pub speculative_accepted: IntCounter,
}

/// Latency buckets from 5 ms to 2 minutes.
fn latency_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ]
}

impl Metrics {
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "overfill_requests_total",
                "HTTP requests answered, by endpoint and status",
            ),
            &["endpoint", "status"],
        )?;
        let queue_depth =
            IntGauge::new("overfill_queue_depth", "Sequences waiting for a batch slot")?;
        let running = IntGauge::new(
            "overfill_running_sequences",
            "Sequences in the running batch",
        )?;
        let prompt_tokens =
            IntCounter::new("overfill_prompt_tokens_total", "Prompt tokens prefilled")?;
        let generated_tokens =
            IntCounter::new("overfill_generated_tokens_total", "Tokens generated")?;
        let prefill_seconds = prometheus::Counter::new(
            "overfill_prefill_seconds_total",
            "Wall time of prefill passes (full model)",
        )?;
        let decode_seconds = prometheus::Counter::new(
            "overfill_decode_seconds_total",
            "Wall time of decode steps (decoder)",
        )?;
        let prefill_tokens_per_second = Gauge::new(
            "overfill_prefill_tokens_per_second",
            "Prompt tokens per second of the latest prefill pass",
        )?;
        let decode_tokens_per_second = Gauge::new(
            "overfill_decode_tokens_per_second",
            "Tokens per second of the latest decode step (batch rows / step time)",
        )?;
        let cancelled = IntCounter::new(
            "overfill_cancelled_sequences_total",
            "Sequences dropped because the client disconnected",
        )?;
        let request_latency = HistogramVec::new(
            HistogramOpts::new(
                "overfill_request_latency_seconds",
                "Request latency, arrival to last byte",
            )
            .buckets(latency_buckets()),
            &["endpoint"],
        )?;
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "overfill_time_to_first_token_seconds",
                "Arrival to first generated token",
            )
            .buckets(latency_buckets()),
        )?;
        let decode_step_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "overfill_decode_step_seconds",
                "Wall time of one batched decode step",
            )
            .buckets(prometheus::exponential_buckets(0.0005, 2.0, 16)?),
        )?;
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("overfill_decode_batch_size", "Rows per decode step")
                .buckets(prometheus::exponential_buckets(1.0, 2.0, 10)?),
        )?;
        let speculative_proposed = IntCounter::new(
            "overfill_speculative_proposed_tokens_total",
            "Draft tokens the decoder proposed (--speculative)",
        )?;
        let speculative_accepted = IntCounter::new(
            "overfill_speculative_accepted_tokens_total",
            "Draft tokens the full model kept (--speculative); over proposed: the acceptance rate",
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(running.clone()))?;
        registry.register(Box::new(prompt_tokens.clone()))?;
        registry.register(Box::new(generated_tokens.clone()))?;
        registry.register(Box::new(prefill_seconds.clone()))?;
        registry.register(Box::new(decode_seconds.clone()))?;
        registry.register(Box::new(prefill_tokens_per_second.clone()))?;
        registry.register(Box::new(decode_tokens_per_second.clone()))?;
        registry.register(Box::new(cancelled.clone()))?;
        registry.register(Box::new(request_latency.clone()))?;
        registry.register(Box::new(time_to_first_token.clone()))?;
        registry.register(Box::new(decode_step_seconds.clone()))?;
        registry.register(Box::new(batch_size.clone()))?;
        registry.register(Box::new(speculative_proposed.clone()))?;
        registry.register(Box::new(speculative_accepted.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            queue_depth,
            running,
            prompt_tokens,
            generated_tokens,
            prefill_seconds,
            decode_seconds,
            prefill_tokens_per_second,
            decode_tokens_per_second,
            cancelled,
            request_latency,
            time_to_first_token,
            decode_step_seconds,
            batch_size,
            speculative_proposed,
            speculative_accepted,
        })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            return format!("# error encoding metrics: {e}\n");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
