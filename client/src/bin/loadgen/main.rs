//! `loadgen`: the Embarcadero-rs load generator. See `loadgen --help`.
//!
//! `cli` holds the flags and the help text, `plan` resolves them into the run, `publish`
//! and `subscribe` run the tests (with `pacing` for a rate and `checks` for the end-to-end
//! verification), `progress` shows how far it got, and `report` prints the results.

#![forbid(unsafe_code)]

mod checks;
mod cli;
mod pacing;
mod plan;
mod progress;
mod publish;
mod report;
mod subscribe;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use client::summary::Summary;
use client::{TopicSpec, create_topic_on_cluster};

use crate::cli::{Cli, TestMode};
use crate::plan::Plan;
use crate::progress::{Progress, start_progress};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let plan = match Plan::from_cli(Cli::parse()) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    eprintln!("{}", plan.describe());
    if plan.create_topic && plan.publishes() && !create_topic(&plan) {
        return ExitCode::from(1);
    }
    let summary = run(&plan);
    print!("{}", report::table(&summary));
    if let Some(path) = &plan.json
        && let Err(error) = report::write_json(path, &summary)
    {
        eprintln!("error: writing {}: {error}", path.display());
        return ExitCode::from(1);
    }
    if summary.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Sends CreateTopic to the lease holder; false (after saying why on stderr) when the
/// topic cannot be had with the plan's settings.
fn create_topic(plan: &Plan) -> bool {
    let spec = TopicSpec {
        topic: plan.topic.clone(),
        order: plan.order,
        ack: plan.ack,
        replication_factor: plan.replication_factor,
        hold_for_subscribers: plan.hold_for_subscribers,
        retention_bytes: plan.retention_bytes,
        retention_ms: plan.retention_ms,
    };
    match create_topic_on_cluster(&plan.brokers, &spec, Duration::from_secs(10)) {
        Ok(created) => {
            eprintln!(
                "topic {}: {} on broker {}",
                plan.topic,
                if created.created {
                    "created"
                } else {
                    "exists with these settings"
                },
                created.broker_id
            );
            true
        }
        Err(error) => {
            eprintln!("error: creating topic {}: {error}", plan.topic);
            if error.broker_code() == Some(wire::ErrorCode::TopicExists) {
                eprintln!(
                    "hint: pick another --topic or match its --order/--ack/--replication-factor"
                );
            }
            false
        }
    }
}

fn run(plan: &Plan) -> Summary {
    let progress = Arc::new(Progress::default());
    let display = start_progress(plan, &progress);
    let summary = match plan.test {
        TestMode::Subscribe => subscribe::run_subscribe(plan, &progress),
        TestMode::Publish | TestMode::Latency | TestMode::EndToEnd => {
            publish::run_publish(plan, &progress)
        }
    };
    progress.done.store(true, Ordering::Relaxed);
    if let Some(display) = display {
        let _ = display.join();
    }
    summary
}
