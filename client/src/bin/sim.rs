//! The whole-system simulation: brokers, the sequencer with standbys, publishers and
//! subscribers over a simulated network and clock, with connection resets, broker crashes
//! and pauses; every seed reproduces its run exactly. See `scripts/sim.sh`.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use client::sim::{SimFault, run};

/// Runs the whole-system simulation over seeds and reports each failure with its seed.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Seeds to run: 0..N (or from --seed on).
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// First seed (with --seeds 1, exactly this seed: a failure's seed reproduces it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Inject a bug into the simulated clients or network; the run must then fail.
    #[arg(long, value_enum)]
    fault: Option<SimFault>,
    /// Run every seed twice and require identical digests (determinism).
    #[arg(long)]
    check_determinism: bool,
    /// Print a line per seed.
    #[arg(long)]
    verbose: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Silent by default (faults make every run warn); RUST_LOG=info tells a seed's story.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
    let started = Instant::now();
    let mut failed = 0u64;
    let (mut messages, mut resets, mut crashes, mut pauses, mut takeovers, mut resends) =
        (0, 0, 0, 0, 0, 0);
    let (mut partitions, mut torn_writes) = (0, 0);
    for seed in args.seed..args.seed + args.seeds {
        match run(seed, args.fault) {
            Ok(report) => {
                if args.check_determinism {
                    match run(seed, args.fault) {
                        Ok(again) if again.digest == report.digest => {}
                        Ok(again) => {
                            failed += 1;
                            println!(
                                "FAIL seed {seed}: not deterministic: digest {:016x} then {:016x}",
                                report.digest, again.digest
                            );
                            continue;
                        }
                        Err(why) => {
                            failed += 1;
                            println!("FAIL (on the second run, not deterministic) {why}");
                            continue;
                        }
                    }
                }
                messages += report.messages;
                resets += report.resets;
                crashes += report.crashes;
                pauses += report.pauses;
                partitions += report.partitions;
                torn_writes += report.torn_writes;
                takeovers += report.takeovers;
                resends += report.resends;
                if args.verbose {
                    println!(
                        "seed {seed}: ok: {} brokers{}, {} publishers, {} subscribers, {} messages, \
                         {} resets, {} crashes, {} pauses, {} partitions, {} takeovers, {} \
                         resends, {} ms simulated, digest {:016x}",
                        report.brokers,
                        if report.replicated {
                            " (replicas, ack 2, pool lost at the end)"
                        } else {
                            ""
                        },
                        report.publishers,
                        report.subscribers,
                        report.messages,
                        report.resets,
                        report.crashes,
                        report.pauses,
                        report.partitions,
                        report.takeovers,
                        report.resends,
                        report.sim_ms,
                        report.digest
                    );
                }
            }
            Err(why) => {
                failed += 1;
                println!("FAIL {why}");
            }
        }
    }
    println!(
        "system simulation: {} seeds from {}, {failed} failed{}; {messages} messages, {resets} \
         resets, {crashes} crashes ({torn_writes} tearing a replica write), {pauses} pauses, {partitions} \
         partitions, {takeovers} takeovers, {resends} resends; {:.1} s",
        args.seeds,
        args.seed,
        args.fault
            .map_or(String::new(), |f| format!(" (fault {f:?})")),
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
