//! Deterministic simulation of the log core: `sim --seeds N [--seed S] [--fault NAME]`.
//!
//! Runs seeds S, S+1, ... S+N-1 (S defaults to 0), each a random world of brokers, topics,
//! publishers and readers on the simulated coherence model, and checks every contract after
//! each run. Exits 0 when every seed passes, 1 when any fails (printing the seed, which
//! reproduces the run exactly with `--seeds 1 --seed S`), 2 on bad arguments.
//!
//! `--fault skip-invalidate` makes the sequencer skip invalidating ring slots before reading
//! them; `--fault skip-flush` makes brokers skip flushing payloads before the ready flag.
//! Both exist only in the simulated memory model. With either, runs must fail.

use std::process::ExitCode;
use std::time::Instant;

use shared_log::sim::{Fault, SimOptions, run};

const USAGE: &str =
    "usage: sim [--seeds N] [--seed S] [--fault skip-invalidate|skip-flush] [--steps N] [--quiet]";

struct Args {
    seeds: u64,
    first_seed: u64,
    fault: Option<Fault>,
    steps: Option<u64>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seeds: 100,
        first_seed: 0,
        fault: None,
        steps: None,
        quiet: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--seeds" => {
                args.seeds = value("--seeds")?
                    .parse()
                    .map_err(|e| format!("--seeds: {e}"))?
            }
            "--seed" => {
                args.first_seed = value("--seed")?
                    .parse()
                    .map_err(|e| format!("--seed: {e}"))?
            }
            "--fault" => args.fault = Some(value("--fault")?.parse()?),
            "--steps" => {
                args.steps = Some(
                    value("--steps")?
                        .parse()
                        .map_err(|e| format!("--steps: {e}"))?,
                )
            }
            "--quiet" => args.quiet = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if message.is_empty() {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            eprintln!("sim: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    let mut failed = Vec::new();
    let (mut batches, mut acks, mut rejections, mut gaps, mut waits) = (0, 0, 0, 0, 0);
    let mut takeovers = 0;
    for seed in args.first_seed..args.first_seed + args.seeds {
        let mut options = SimOptions::new(seed);
        options.fault = args.fault;
        if let Some(steps) = args.steps {
            options.steps = steps;
        }
        match run(options) {
            Ok(report) => {
                batches += report.batches_in_log;
                acks += report.acks;
                rejections += report.rejections;
                gaps += report.gaps_resolved;
                waits += report.backpressure_waits;
                takeovers += report.takeovers;
                if !args.quiet && args.seeds <= 10 {
                    println!("{report:?}");
                }
            }
            Err(violation) => {
                println!("FAIL {violation}");
                failed.push(seed);
            }
        }
        let done = seed - args.first_seed + 1;
        if !args.quiet && args.seeds > 10 && done % (args.seeds / 10).max(1) == 0 {
            println!(
                "{done}/{} seeds, {} failed, {:.1}s",
                args.seeds,
                failed.len(),
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "sim: {} seeds from {}, fault {:?}: {} passed, {} failed; {batches} batches in logs, {acks} acks, \
         {rejections} explicit rejections, {gaps} gaps resolved, {waits} backpressure waits, \
         {takeovers} sequencer takeovers, {:.1}s",
        args.seeds,
        args.first_seed,
        args.fault,
        args.seeds - failed.len() as u64,
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!(
            "failing seeds (first 20): {:?}",
            &failed[..failed.len().min(20)]
        );
        ExitCode::FAILURE
    }
}
