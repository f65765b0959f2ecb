//! `xdp-ctl`: inspect and clean up the Embarcadero-rs XDP steering program.
//!
//! ```text
//! xdp-ctl status IF     attached or not, program id, name and mode
//! xdp-ctl detach IF     remove whatever XDP program IF has (leftover of a crashed broker)
//! xdp-ctl counters IF   the steering program's counters (redirected, passed, ...)
//! xdp-ctl queues IF     the number of rx queues of IF
//! ```
//!
//! Acts in the network namespace it runs in: use `ip netns exec NS xdp-ctl ...`.
//! Exit status: 0 on success, 1 on error (the message says what to do), and for `status`
//! 0 when a program is attached, 3 when none is.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Inspect and clean up the Embarcadero-rs XDP steering program.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print whether IF has an XDP program, and its id, name and mode (exit 3 when none).
    Status {
        /// The interface.
        ifname: String,
    },
    /// Remove whatever XDP program IF has, e.g. the leftover of a crashed broker.
    Detach {
        /// The interface.
        ifname: String,
    },
    /// Print the counters of the steering program attached to IF, one `name value` a line.
    Counters {
        /// The interface.
        ifname: String,
    },
    /// Print the number of rx queues of IF.
    Queues {
        /// The interface.
        ifname: String,
    },
}

fn run(command: Command) -> Result<ExitCode, xdp_prog::XdpError> {
    match command {
        Command::Status { ifname } => match xdp_prog::status(&ifname)? {
            Some(program) => {
                println!(
                    "{ifname}: XDP program id {} name {} mode {}",
                    program.prog_id, program.name, program.mode
                );
                Ok(ExitCode::SUCCESS)
            }
            None => {
                println!("{ifname}: no XDP program");
                Ok(ExitCode::from(3))
            }
        },
        Command::Detach { ifname } => {
            if xdp_prog::detach(&ifname)? {
                println!("{ifname}: XDP program detached");
            } else {
                println!("{ifname}: no XDP program was attached");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Counters { ifname } => {
            let counters = xdp_prog::attached_counters(&ifname)?;
            println!("redirected {}", counters.redirected);
            println!("passed {}", counters.passed);
            println!("no_socket {}", counters.no_socket);
            println!("malformed {}", counters.malformed);
            println!("syn_cookie_sent {}", counters.syn_cookie_sent);
            println!("cookie_valid {}", counters.cookie_valid);
            println!("cookie_invalid {}", counters.cookie_invalid);
            println!("syn_dropped {}", counters.syn_dropped);
            Ok(ExitCode::SUCCESS)
        }
        Command::Queues { ifname } => {
            println!("{}", xdp_prog::queue_count(&ifname)?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Prints log records (this crate's and libbpf's) to stderr, info and above.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("xdp-ctl: {}: {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

fn main() -> ExitCode {
    // Only fails if a logger is already set, which cannot happen this early.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("xdp-ctl: {error}");
            ExitCode::FAILURE
        }
    }
}
