use clap::Parser;

fn main() {
    let cli = fcd::cli::Cli::parse();
    if let Err(e) = fcd::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
