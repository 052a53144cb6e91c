//! Every decision a layer makes, reported once: a `tracing` event (target `tower_sse`) and,
//! with the `metrics` feature, a metric through the `metrics` facade. The names and labels are
//! listed in the crate docs (Operations); nothing here costs more than a disabled-callsite check
//! when no subscriber or recorder listens, and the metric calls are not compiled without the
//! feature.

/// Emits through the `metrics` facade, only with the `metrics` feature.
macro_rules! metric {
    ($($body:tt)*) => {
        #[cfg(feature = "metrics")]
        {
            $($body)*
        }
    };
}

/// Why an event stream ended, as the passthrough layer saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Close {
    /// The body ended.
    End,
    /// The body failed.
    Error,
    /// The client went away (the body was dropped before its end).
    ClientGone,
}

impl Close {
    fn label(self) -> &'static str {
        match self {
            Self::End => "end",
            Self::Error => "error",
            Self::ClientGone => "client_gone",
        }
    }
}

/// What ended a stream or an answer early.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Timeout {
    Idle,
    Response,
    Lifetime,
    Shutdown,
}

impl Timeout {
    fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Response => "response",
            Self::Lifetime => "lifetime",
            Self::Shutdown => "shutdown",
        }
    }
}

pub(crate) fn stream_opened() {
    tracing::debug!(target: "tower_sse", "event stream opened");
    metric! {
        metrics::counter!("sse_streams_opened_total").increment(1);
        metrics::gauge!("sse_streams_open").increment(1.0);
    }
}

pub(crate) fn stream_closed(close: Close, bytes: u64) {
    let reason = close.label();
    tracing::debug!(target: "tower_sse", reason, bytes, "event stream closed");
    metric! {
        metrics::counter!("sse_streams_closed_total", "reason" => reason).increment(1);
        metrics::gauge!("sse_streams_open").decrement(1.0);
    }
}

/// How late a stream's frame and byte counts may reach the recorder. Every stream adds to the
/// same two counters, so adding per frame makes the cores fight over them (about 1.5 % of a
/// proxy's CPU per event at 10,000 events/s); a second is far below any scrape interval.
#[cfg(feature = "metrics")]
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A stream's frame and byte counters: looked up once per stream, and added to at most once a
/// [second](REPORT_EVERY) (the first frame at once) and when the stream ends.
#[derive(Debug)]
pub(crate) struct FrameCounters {
    #[cfg(feature = "metrics")]
    frames: metrics::Counter,
    #[cfg(feature = "metrics")]
    bytes: metrics::Counter,
    #[cfg(feature = "metrics")]
    unreported: (u64, u64),
    #[cfg(feature = "metrics")]
    reported_at: Option<std::time::Instant>,
}

impl FrameCounters {
    pub(crate) fn new() -> Self {
        Self {
            #[cfg(feature = "metrics")]
            frames: metrics::counter!("sse_frames_sent_total"),
            #[cfg(feature = "metrics")]
            bytes: metrics::counter!("sse_bytes_sent_total"),
            #[cfg(feature = "metrics")]
            unreported: (0, 0),
            #[cfg(feature = "metrics")]
            reported_at: None,
        }
    }

    pub(crate) fn sent(&mut self, bytes: usize) {
        tracing::trace!(target: "tower_sse", bytes, "frame sent");
        metric! {
            self.unreported.0 += 1;
            self.unreported.1 += bytes as u64;
            let now = std::time::Instant::now();
            if self
                .reported_at
                .is_none_or(|at| now.duration_since(at) >= REPORT_EVERY)
            {
                self.reported_at = Some(now);
                self.report();
            }
        }
    }

    /// Adds what was sent since the last report.
    pub(crate) fn report(&mut self) {
        metric! {
            let (frames, bytes) = std::mem::take(&mut self.unreported);
            if frames > 0 {
                self.frames.increment(frames);
                self.bytes.increment(bytes);
            }
        }
    }
}

impl Drop for FrameCounters {
    fn drop(&mut self) {
        self.report();
    }
}

pub(crate) fn headers_applied(content_type_set: bool) {
    tracing::trace!(target: "tower_sse", content_type_set, "event-stream header policy applied");
}

pub(crate) fn not_acceptable() {
    tracing::debug!(target: "tower_sse", "406: Accept rules out an event stream");
    metric! {
        metrics::counter!("sse_rejected_total", "reason" => "not_acceptable").increment(1);
    }
}

pub(crate) fn heartbeat_sent() {
    tracing::trace!(target: "tower_sse", "heartbeat sent");
    metric! {
        metrics::counter!("sse_heartbeats_total").increment(1);
    }
}

pub(crate) fn timed_out(kind: Timeout) {
    let kind = kind.label();
    tracing::debug!(target: "tower_sse", kind, "event stream ended by a limit");
    metric! {
        metrics::counter!("sse_timeouts_total", "kind" => kind).increment(1);
    }
}

/// A request with a replay plan: where it resumed and how many events were replayed.
pub(crate) fn replayed(resumed: &'static str, events: usize) {
    tracing::debug!(target: "tower_sse", resumed, events, "replay");
    metric! {
        metrics::counter!("sse_replay_requests_total", "resumed" => resumed).increment(1);
        metrics::counter!("sse_replay_events_total").increment(events as u64);
    }
    let _ = events;
}

pub(crate) fn unknown_id() {
    tracing::debug!(target: "tower_sse", "Last-Event-ID unknown, expired, too long or invalid");
    metric! {
        metrics::counter!("sse_replay_unknown_ids_total").increment(1);
    }
}

pub(crate) fn store_failed(error: &dyn std::fmt::Display) {
    tracing::warn!(target: "tower_sse", %error, "replay store failed; serving without replay");
    metric! {
        metrics::counter!("sse_replay_store_failures_total").increment(1);
    }
}

/// A batch of appends a networked store could not write (it sends them again).
#[cfg(feature = "redis")]
pub(crate) fn store_write_failed() {
    metric! {
        metrics::counter!("sse_replay_store_write_failures_total").increment(1);
    }
}

/// Appends a networked store dropped: its queue was full.
#[cfg(feature = "redis")]
pub(crate) fn store_writes_dropped(events: u64) {
    metric! {
        metrics::counter!("sse_replay_store_dropped_total").increment(events);
    }
    let _ = events;
}

/// A read a networked store answered from its local tier (`reason`: `failed`, `unknown`, `more`).
#[cfg(feature = "redis")]
pub(crate) fn store_local_read(reason: &'static str) {
    tracing::debug!(target: "tower_sse", reason, "replay store: read answered by the local tier");
    metric! {
        metrics::counter!("sse_replay_store_local_reads_total", "reason" => reason).increment(1);
    }
}

#[cfg(feature = "metrics")]
pub(crate) fn store_size(keys: usize, events: usize) {
    metrics::gauge!("sse_replay_store_keys").set(keys as f64);
    metrics::gauge!("sse_replay_store_events").set(events as f64);
}

pub(crate) fn subscription_opened() {
    tracing::debug!(target: "tower_sse", "fan-out subscription opened");
    metric! {
        metrics::gauge!("sse_fanout_subscriptions").increment(1.0);
    }
}

pub(crate) fn subscription_closed(reason: &'static str) {
    tracing::debug!(target: "tower_sse", reason, "fan-out subscription closed");
    metric! {
        metrics::gauge!("sse_fanout_subscriptions").decrement(1.0);
    }
}

pub(crate) fn subscribers_changed(delta: isize) {
    metric! {
        metrics::gauge!("sse_fanout_clients").increment(delta as f64);
    }
    let _ = delta;
}

pub(crate) fn slow_client(policy: &'static str) {
    tracing::info!(target: "tower_sse", policy, "fan-out client too slow");
    metric! {
        metrics::counter!("sse_fanout_slow_clients_total", "policy" => policy).increment(1);
    }
}

/// A subscribe request's outcome: `provisioned` or `disposable` (a channel opened),
/// `suspended` or `unknown` (refused).
#[cfg(feature = "subscriptions")]
pub(crate) fn subscription_channel(outcome: &'static str, subscription: &str) {
    tracing::debug!(target: "tower_sse", outcome, subscription, "subscription channel");
    metric! {
        metrics::counter!("sse_subscription_channels_total", "outcome" => outcome).increment(1);
    }
}

/// Open channels of a subscription closed because it was suspended or deleted.
#[cfg(feature = "subscriptions")]
pub(crate) fn subscription_channels_closed(subscription: &str, channels: usize) {
    tracing::debug!(target: "tower_sse", subscription, channels, "closing a suspended or deleted subscription's channels");
    metric! {
        metrics::counter!("sse_subscription_closed_channels_total").increment(channels as u64);
    }
}

pub(crate) fn fanned_out(events: usize) {
    metric! {
        metrics::counter!("sse_fanout_events_total").increment(events as u64);
    }
    let _ = events;
}

/// A compressed stream's byte counters, looked up once per stream.
#[cfg(feature = "compression")]
#[derive(Debug)]
pub(crate) struct CompressionCounters {
    encoding: &'static str,
    #[cfg(feature = "metrics")]
    raw: metrics::Counter,
    #[cfg(feature = "metrics")]
    encoded: metrics::Counter,
}

#[cfg(feature = "compression")]
impl CompressionCounters {
    pub(crate) fn new(encoding: &'static str) -> Self {
        Self {
            encoding,
            #[cfg(feature = "metrics")]
            raw: metrics::counter!("sse_compression_in_bytes_total", "encoding" => encoding),
            #[cfg(feature = "metrics")]
            encoded: metrics::counter!("sse_compression_out_bytes_total", "encoding" => encoding),
        }
    }

    pub(crate) fn compressed(&self, raw: usize, encoded: usize) {
        let encoding = self.encoding;
        tracing::trace!(target: "tower_sse", encoding, raw, encoded, "frame compressed");
        metric! {
            self.raw.increment(raw as u64);
            self.encoded.increment(encoded as u64);
        }
    }
}
