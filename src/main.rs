use clap::Parser;

fn main() {
    let cli = fcd::cli::Cli::parse();
    fcd::io::atomic::install_signal_handlers();
    let result = fcd::cli::run(cli).and_then(|()| fcd::io::atomic::interrupted());
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
