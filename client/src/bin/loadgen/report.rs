//! The results: a table on stdout and the JSON summary (`--json`).

use std::fmt::Write as _;
use std::path::Path;

use client::LatencySummary;
use client::summary::Summary;

/// A row of the table: its name and its value.
type Row = (&'static str, String);

/// The results as a table of name and value, with the errors after it.
pub(crate) fn table(summary: &Summary) -> String {
    let mut rows = run_rows(summary);
    if summary.publishers > 0 {
        rows.extend(publisher_rows(summary));
    }
    rows.extend([
        ("throughput MB/s", format!("{:.1}", summary.mb_per_s)),
        ("throughput msgs/s", format!("{:.0}", summary.msgs_per_s)),
    ]);
    let checked = summary.test == "end-to-end" || summary.test == "latency";
    if checked || summary.test == "subscribe" {
        rows.extend(delivery_rows(summary));
    }
    if checked {
        rows.extend(check_rows(summary));
    }
    rows.push(("passed", summary.passed.to_string()));
    let width = rows.iter().map(|(name, _)| name.len()).max().unwrap_or(0);
    let mut text = String::new();
    for (name, value) in rows {
        let _ = writeln!(text, "{name:<width$}  {value}");
    }
    for error in &summary.errors {
        let _ = writeln!(text, "error: {error}");
    }
    text
}

/// What was run.
fn run_rows(summary: &Summary) -> Vec<Row> {
    vec![
        ("test", summary.test.clone()),
        ("backend", summary.backend.clone()),
        ("brokers", summary.brokers.join(",")),
        ("topic", summary.topic.clone()),
        (
            "order / ack",
            format!("{} / {}", summary.order, summary.ack),
        ),
        ("publishers", summary.publishers.to_string()),
        (
            "connections per broker",
            summary.connections_per_broker.to_string(),
        ),
        ("connections (total)", summary.connections.to_string()),
        ("message bytes", summary.message_bytes.to_string()),
        ("seconds", format!("{:.3}", summary.seconds)),
    ]
}

/// Percentiles of a latency, as one table cell.
fn percentiles(latency: &LatencySummary) -> String {
    format!(
        "{} / {} / {} / {} / {}",
        latency.p50, latency.p90, latency.p99, latency.p999, latency.max
    )
}

/// What the publishers sent and had acknowledged.
fn publisher_rows(summary: &Summary) -> Vec<Row> {
    let mut rows = vec![
        ("messages sent", summary.messages_sent.to_string()),
        ("messages acked", summary.messages_acked.to_string()),
        ("bytes acked", summary.bytes_acked.to_string()),
        ("rejected (not ordered)", summary.rejected.to_string()),
        (
            "reconnects / resent / duplicate acks",
            format!(
                "{} / {} / {}",
                summary.reconnects, summary.batches_resent, summary.duplicate_acks
            ),
        ),
        (
            "ack latency us (from sealing) p50/p90/p99/p99.9/max",
            percentiles(&summary.ack_latency_us),
        ),
    ];
    if summary.rate_msgs_per_s > 0 {
        rows.push((
            "ack latency us (from due time) p50/p90/p99/p99.9/max",
            percentiles(&summary.ack_latency_from_intended_us),
        ));
    }
    if summary.e2e_latency_from_intended_us.count > 0 {
        rows.push((
            "e2e latency us (from due time) p50/p90/p99/p99.9/max",
            percentiles(&summary.e2e_latency_from_intended_us),
        ));
    }
    if summary.burst_writes > 0 {
        rows.push((
            "batches written in bursts / writes",
            format!("{} / {}", summary.burst_write_batches, summary.burst_writes),
        ));
    }
    rows.push((
        "loadgen CPU cores",
        format!("{:.3}", summary.loadgen_cpu_cores),
    ));
    rows
}

/// What the subscriber received.
fn delivery_rows(summary: &Summary) -> [Row; 4] {
    [
        ("messages received", summary.messages_received.to_string()),
        (
            "subscriber redirects",
            summary.subscriber_redirects.to_string(),
        ),
        (
            "position gaps / duplicates",
            format!(
                "{} / {}",
                summary.position_gaps, summary.position_duplicates
            ),
        ),
        ("corrupt", summary.corrupt.to_string()),
    ]
}

/// The end-to-end checks.
fn check_rows(summary: &Summary) -> [Row; 4] {
    [
        ("lost", summary.lost.to_string()),
        ("duplicates", summary.duplicates.to_string()),
        (
            "order violations",
            format!(
                "{} (check: {})",
                summary.order_violations, summary.order_check
            ),
        ),
        ("foreign (other runs)", summary.foreign.to_string()),
    ]
}

/// Writes the summary as pretty JSON, with a final newline.
pub(crate) fn write_json(path: &Path, summary: &Summary) -> Result<(), String> {
    serde_json::to_string_pretty(summary)
        .map_err(|e| e.to_string())
        .and_then(|json| std::fs::write(path, json + "\n").map_err(|e| e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::parse;

    #[test]
    fn table_lists_the_checks() {
        let mut summary = parse("--brokers 127.0.0.1:9000 --test end-to-end")
            .unwrap()
            .summary();
        summary.lost = 3;
        summary.errors.push("publisher 0: broken".into());
        let text = table(&summary);
        assert!(text.contains("lost"));
        assert!(text.contains("order violations"));
        assert!(text.contains("error: publisher 0: broken"));
    }
}
