//! The deterministic simulation as a test: green over many seeds, red with each injected
//! coherence fault, and the same seed gives the same run.

use shared_log::sim::{Fault, SimOptions, run};

#[test]
fn simulation_holds_every_contract_over_300_seeds() {
    for seed in 0..300 {
        if let Err(violation) = run(SimOptions::new(seed)) {
            panic!(
                "{violation} (reproduce: cargo run --release -p shared-log --example sim -- --seeds 1 --seed {seed})"
            );
        }
    }
}

#[test]
fn a_seed_reproduces_its_run_exactly() {
    for seed in [3, 77, 1234] {
        assert_eq!(run(SimOptions::new(seed)), run(SimOptions::new(seed)));
    }
}

fn failures_with(fault: Fault, seeds: u64) -> u64 {
    (0..seeds)
        .filter(|&seed| {
            let mut options = SimOptions::new(seed);
            options.fault = Some(fault);
            options.drain_steps_max = 3_000;
            run(options).is_err()
        })
        .count() as u64
}

#[test]
fn skipping_the_sequencers_invalidation_is_caught() {
    // Only rings that wrap expose stale lines; nearly every world wraps one.
    let failed = failures_with(Fault::SkipInvalidate, 40);
    assert!(
        failed >= 36,
        "only {failed} of 40 seeds caught a skipped invalidation"
    );
}

#[test]
fn skipping_the_writers_flush_is_caught() {
    let failed = failures_with(Fault::SkipFlush, 40);
    assert_eq!(
        failed, 40,
        "only {failed} of 40 seeds caught a skipped flush"
    );
}
