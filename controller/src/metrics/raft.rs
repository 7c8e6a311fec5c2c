//! The instruments the Raft node itself records into: proposal latency (on the handle) and
//! snapshot duration (in the node's loop). Unset in tests and tools that do not serve metrics.

use prometheus::{Histogram, HistogramOpts, exponential_buckets};

/// Histograms handed to a node through its config.
#[derive(Debug, Clone, Default)]
pub struct RaftMetrics {
    pub proposal_seconds: Option<Histogram>,
    pub snapshot_seconds: Option<Histogram>,
}

impl RaftMetrics {
    pub fn new() -> prometheus::Result<Self> {
        Ok(RaftMetrics {
            proposal_seconds: Some(Histogram::with_opts(
                HistogramOpts::new(
                    "tug_raft_proposal_duration_seconds",
                    "Time from proposing a command to its being applied on the leader.",
                )
                .buckets(exponential_buckets(0.0005, 2.0, 14)?),
            )?),
            snapshot_seconds: Some(Histogram::with_opts(
                HistogramOpts::new(
                    "tug_raft_snapshot_duration_seconds",
                    "Time to snapshot the state machine and compact the log (its count is the \
                     number of snapshots taken).",
                )
                .buckets(exponential_buckets(0.001, 2.0, 14)?),
            )?),
        })
    }

    pub fn observe_proposal(&self, seconds: f64) {
        if let Some(h) = &self.proposal_seconds {
            h.observe(seconds);
        }
    }

    pub fn observe_snapshot(&self, seconds: f64) {
        if let Some(h) = &self.snapshot_seconds {
            h.observe(seconds);
        }
    }
}
