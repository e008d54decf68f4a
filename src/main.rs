//! The `fcd` command line: arguments parsed and checked here, the work done by the library.

mod cli;

use clap::Parser;

fn main() {
    let args = cli::Cli::parse();
    // A run that finished is a success, whatever signal came during its last steps: its
    // outputs are complete.
    let result = fcd::io::atomic::install_signal_handlers().and_then(|()| cli::run(args));
    if let Err(e) = result {
        // One line, whatever names from the files the message quotes.
        eprintln!("error: {}", fcd::io::one_line(&e));
        // A stopped run exits as the signal would have made it.
        let code = match e.downcast_ref::<fcd::io::atomic::Interrupted>() {
            Some(i) => 128 + i.signal,
            None => 1,
        };
        std::process::exit(code);
    }
}
